package devconfig

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/inputguard"
)

// Session is the session a report came on, as the broker tells it
// (broker.Session; this package does not import the broker).
type Session = inputguard.Session

// HandleReport takes a message a device published on
// devices/{id}/config/reported. It runs on the device's connection
// goroutine and returns once the report is stored, so that it is
// acknowledged only then: an error (the database) leaves it
// unacknowledged, and the device sends it again.
//
// Everything in a report is untrusted. A report that is malformed,
// oversized or names a version never sent (ahead of the desired one) is
// not stored: it is acknowledged, counted, and recorded as a rejected
// event once per session however many follow. Reports above the session's
// rate (ReportRate) are dropped before any parsing or lookup. A report of
// an older version is stored: the API shows it as stale.
func (s *Service) HandleReport(sess Session, payload []byte) error {
	if !s.reports.Admit(sess) {
		return nil
	}
	now := s.opts.Now()
	m, err := ParseReport(payload, s.opts.Limits)
	if err != nil {
		s.reports.Refuse(sess, "malformed", err.Error())
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	desired, ok, err := s.store.SaveReport(ctx, sess.DeviceID, m, now)
	if errors.Is(err, fleet.ErrNotFound) {
		// Deleted while connected: nothing to store, nothing to send again.
		s.reports.Refuse(sess, "unknown", "configuration report of a device fleetd no longer has")
		return nil
	}
	if err != nil {
		return fmt.Errorf("record the configuration report of %s: %w", sess.DeviceID, err)
	}
	if !ok {
		s.reports.Refuse(sess, "ahead", fmt.Sprintf("configuration report of version %d, ahead of the desired version %d", m.Version, desired))
		return nil
	}
	s.m.reports.WithLabelValues("stored").Inc()
	return nil
}
