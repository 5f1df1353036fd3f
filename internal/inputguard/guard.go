// Package inputguard bounds what a device may make fleetd do through one of
// its inputs (command responses, configuration reports): a rate per device,
// checked before anything is parsed or looked up, and a refusal that is
// counted every time but recorded as a rejected event (and logged) once per
// session, however many follow. The state per device is forgotten after an
// hour without input, so it is bounded by the devices that sent recently.
package inputguard

import (
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/untrusted"
)

// Session is the session an input came on, as the broker tells it.
type Session struct {
	DeviceID        string
	Epoch           int64
	Firmware, Model string
}

// EventSink takes the rejected events, without blocking (fleet.Recorder).
type EventSink interface {
	Record(fleet.Event)
}

// Options configure a Guard; every field is required.
type Options struct {
	// What names one input, singular: "command response".
	What string
	// Rate and Burst bound the inputs per second of one device.
	Rate  float64
	Burst int
	// Count counts an input by result ("rate", "malformed", …).
	Count  func(result string)
	Events EventSink
	Node   string
	Now    func() time.Time
	Logger *slog.Logger
}

// Guard keeps the per-device state of one input.
type Guard struct {
	o        Options
	sessions sync.Map // device id → *state
}

type state struct {
	mu           sync.Mutex
	limiter      *rate.Limiter
	seen         time.Time
	problemEpoch int64
}

// IdleAfter is how long a device may send nothing on the input before its
// state is forgotten.
const IdleAfter = time.Hour

// New returns a Guard.
func New(o Options) *Guard { return &Guard{o: o} }

// Admit notes an input of the session and reports whether the device's
// rate allows it; one above the rate is refused ("rate").
func (g *Guard) Admit(sess Session) bool {
	now := g.o.Now()
	st := g.state(sess.DeviceID, now)
	st.mu.Lock()
	st.seen = now
	allowed := st.limiter.AllowN(now, 1)
	st.mu.Unlock()
	if !allowed {
		g.Refuse(sess, "rate", fmt.Sprintf("%ss above %g per second (burst %d) dropped", g.o.What, g.o.Rate, g.o.Burst))
	}
	return allowed
}

func (g *Guard) state(id string, now time.Time) *state {
	if v, ok := g.sessions.Load(id); ok {
		return v.(*state)
	}
	v, _ := g.sessions.LoadOrStore(id, &state{limiter: rate.NewLimiter(rate.Limit(g.o.Rate), g.o.Burst), seen: now})
	return v.(*state)
}

// Refuse counts a refused input under result and records it as a rejected
// event, why its detail (bounded, printable), once per session.
func (g *Guard) Refuse(sess Session, result, why string) {
	g.o.Count(result)
	st := g.state(sess.DeviceID, g.o.Now())
	st.mu.Lock()
	record := st.problemEpoch != sess.Epoch
	st.problemEpoch = sess.Epoch
	st.mu.Unlock()
	if !record {
		return
	}
	why = untrusted.Text(why+" (reported once per session)", 300)
	now := g.o.Now()
	g.o.Events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: sess.DeviceID, At: now, Kind: fleet.KindRejected,
		Detail: why, Firmware: sess.Firmware, Model: sess.Model, SessionEpoch: sess.Epoch, BrokerNode: g.o.Node})
	g.o.Logger.Warn(g.o.What+" refused", "device_id", sess.DeviceID, "session_epoch", sess.Epoch, "why", why)
}

// ForgetIdle drops the state of devices that sent nothing for IdleAfter.
func (g *Guard) ForgetIdle(now time.Time) {
	g.sessions.Range(func(k, v any) bool {
		st := v.(*state)
		st.mu.Lock()
		idle := now.Sub(st.seen) > IdleAfter
		st.mu.Unlock()
		if idle {
			g.sessions.CompareAndDelete(k, v)
		}
		return true
	})
}
