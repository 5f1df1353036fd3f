package devconfig

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/untrusted"
)

// Session is the session a report came on, as the broker tells it
// (broker.Session; this package does not import the broker).
type Session struct {
	DeviceID        string
	Epoch           int64
	Firmware, Model string
}

// sessionState is what the handler keeps per device: its report rate and
// the session whose refusal was recorded.
type sessionState struct {
	mu           sync.Mutex
	limiter      *rate.Limiter
	seen         time.Time
	problemEpoch int64
}

// idleAfter is how long a device may send no report before its state is
// forgotten.
const idleAfter = time.Hour

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
	now := s.opts.Now()
	st := s.session(sess.DeviceID, now)
	st.mu.Lock()
	st.seen = now
	allowed := st.limiter.AllowN(now, 1)
	st.mu.Unlock()
	if !allowed {
		s.refuse(sess, st, "rate", fmt.Sprintf("configuration reports above %g per second (burst %d) dropped", s.opts.ReportRate, s.opts.ReportBurst))
		return nil
	}
	m, err := ParseReport(payload, s.opts.Limits)
	if err != nil {
		s.refuse(sess, st, "malformed", err.Error())
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	desired, ok, err := s.store.SaveReport(ctx, sess.DeviceID, m, now)
	if errors.Is(err, fleet.ErrNotFound) {
		// Deleted while connected: nothing to store, nothing to send again.
		s.refuse(sess, st, "unknown", "configuration report of a device fleetd no longer has")
		return nil
	}
	if err != nil {
		return fmt.Errorf("record the configuration report of %s: %w", sess.DeviceID, err)
	}
	if !ok {
		s.refuse(sess, st, "ahead", fmt.Sprintf("configuration report of version %d, ahead of the desired version %d", m.Version, desired))
		return nil
	}
	s.m.reports.WithLabelValues("stored").Inc()
	return nil
}

func (s *Service) session(id string, now time.Time) *sessionState {
	if v, ok := s.sessions.Load(id); ok {
		return v.(*sessionState)
	}
	v, _ := s.sessions.LoadOrStore(id, &sessionState{limiter: rate.NewLimiter(rate.Limit(s.opts.ReportRate), s.opts.ReportBurst), seen: now})
	return v.(*sessionState)
}

// refuse counts a refused report and records it as a rejected event, once
// per session.
func (s *Service) refuse(sess Session, st *sessionState, result, why string) {
	s.m.reports.WithLabelValues(result).Inc()
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
	s.log.Warn("configuration report refused", "device_id", sess.DeviceID, "session_epoch", sess.Epoch, "why", why)
}

// forgetIdle drops the state of devices that sent no report for an hour.
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
