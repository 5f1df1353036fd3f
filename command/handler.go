package command

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/untrusted"
)

// Session is the session a response came on, as the broker tells it
// (broker.Session; this package does not import the broker).
type Session struct {
	DeviceID        string
	Epoch           int64
	Firmware, Model string
}

// sessionState is what the handler keeps per device: its response rate and
// the session whose refusal was recorded.
type sessionState struct {
	mu           sync.Mutex
	limiter      *rate.Limiter
	seen         time.Time
	problemEpoch int64
}

// idleAfter is how long a device may send no response before its state is
// forgotten.
const idleAfter = time.Hour

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
	now := s.opts.Now()
	st := s.session(sess.DeviceID, now)
	st.mu.Lock()
	st.seen = now
	allowed := st.limiter.AllowN(now, 1)
	st.mu.Unlock()
	if !allowed {
		s.refuse(sess, st, "rate", fmt.Sprintf("command responses above %g per second (burst %d) dropped", s.opts.ResponseRate, s.opts.ResponseBurst))
		return nil
	}
	r, err := ParseResponse(payload, correlation, s.opts.Limits)
	if err != nil {
		s.refuse(sess, st, "malformed", "command "+err.Error())
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
	s.refuse(sess, st, string(why), why.Explain(r.ID, found))
	return nil
}

func (s *Service) session(id string, now time.Time) *sessionState {
	if v, ok := s.sessions.Load(id); ok {
		return v.(*sessionState)
	}
	v, _ := s.sessions.LoadOrStore(id, &sessionState{limiter: rate.NewLimiter(rate.Limit(s.opts.ResponseRate), s.opts.ResponseBurst), seen: now})
	return v.(*sessionState)
}

// refuse counts a refused response and records it as a rejected event,
// once per session.
func (s *Service) refuse(sess Session, st *sessionState, result, why string) {
	s.m.responses.WithLabelValues(result).Inc()
	st.mu.Lock()
	record := st.problemEpoch != sess.Epoch
	st.problemEpoch = sess.Epoch
	st.mu.Unlock()
	if !record {
		return
	}
	why = untrusted.Text(why+" (reported once per session)", 300)
	now := s.opts.Now()
	s.events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: sess.DeviceID, At: now, Kind: fleet.KindRejected,
		Detail: why, Firmware: sess.Firmware, Model: sess.Model, SessionEpoch: sess.Epoch, BrokerNode: s.opts.Node})
	s.log.Warn("command response refused", "device_id", sess.DeviceID, "session_epoch", sess.Epoch, "why", why)
}

// forgetIdle drops the state of devices that sent no response for an hour.
func (s *Service) forgetIdle(now time.Time) {
	s.sessions.Range(func(k, v any) bool {
		st := v.(*sessionState)
		st.mu.Lock()
		idle := now.Sub(st.seen) > idleAfter
		st.mu.Unlock()
		if idle {
			s.sessions.CompareAndDelete(k, v)
		}
		return true
	})
}
