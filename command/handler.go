package command

import (
	"context"
	"fmt"
	"time"

	"github.com/fleetd/fleetd/internal/inputguard"
)

// Session is the session a response came on, as the broker tells it
// (broker.Session; this package does not import the broker).
type Session = inputguard.Session

// HandleResponse takes a message a device published on
// devices/{id}/cmd/response; correlation is its MQTT 5 Correlation Data. It
// runs on the device's connection goroutine and returns once the answer is
// stored, so that a response is acknowledged only then: an error (the
// database) leaves it unacknowledged, and the device sends it again.
//
// Everything in a response is untrusted. A response that is malformed or
// oversized, names an unknown command, a command of another device or one
// already finished settles nothing: it is acknowledged, counted, and
// recorded as a rejected event once per session however many follow.
// Responses above the session's rate (ResponseRate) are dropped before any
// lookup, so a flood costs the database nothing.
func (s *Service) HandleResponse(sess Session, payload, correlation []byte) error {
	if !s.responses.Admit(sess) {
		return nil
	}
	now := s.opts.Now()
	r, err := ParseResponse(payload, correlation, s.opts.Limits)
	if err != nil {
		s.responses.Refuse(sess, "malformed", "command "+err.Error())
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, ok, err := s.store.Settle(ctx, sess.DeviceID, r, now)
	if err != nil {
		return fmt.Errorf("record the response to %s: %w", r.ID, err)
	}
	if ok {
		s.m.responses.WithLabelValues("settled").Inc()
		s.changed(c)
		return nil
	}
	found, present, err := s.store.lookup(ctx, r.ID)
	if err != nil {
		return fmt.Errorf("look up command %s: %w", r.ID, err)
	}
	why := Judge(present, found, sess.DeviceID)
	if why == RefuseNone {
		why = RefuseFinished // settled between the two statements
	}
	s.responses.Refuse(sess, string(why), why.Explain(r.ID, found))
	return nil
}
