package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/inputguard"
	"github.com/fleetd/fleetd/internal/untrusted"
)

// Session is the session a message came on, as the broker tells it
// (broker.Session; this package does not import the broker).
type Session = inputguard.Session

// EventSink takes the rejected events telemetry records, without blocking
// (fleet.Recorder).
type EventSink interface {
	Record(fleet.Event)
}

// Queue takes parsed messages without blocking and says whether it kept
// them (Writer).
type Queue interface {
	Enqueue(Entry) bool
}

// Entry is a message on its way to the database.
type Entry struct {
	DeviceID string
	// At is when fleetd received the message, in microseconds (PostgreSQL's
	// precision), strictly increasing per device so that no two of a
	// device's points share a key.
	At time.Time
	Message
}

// IngestOptions tune the edge.
type IngestOptions struct {
	// Rate and Burst bound the messages per second each device may have
	// stored; the ones above are dropped (sampled). Rate -1 is unlimited.
	// Default 1 per second, burst 10.
	Rate  float64
	Burst int
	// MaxNames bounds the distinct metric names a device may use while it
	// is known (see Ingest), so that a device inventing names cannot grow
	// the rollups without bound. Default 64.
	MaxNames int
	// Node names this replica in events.
	Node string
	// Now is the clock; nil is time.Now.
	Now        func() time.Time
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// reportEvery is how often a sampled device gets a rejected event saying how
// many of its messages were dropped, and how often the summary of sampled
// and refused messages is logged.
const reportEvery = time.Minute

// idleAfter is how long a device may send nothing before its state (rate,
// names, what was reported) is forgotten.
const idleAfter = time.Hour

// Ingest is the broker's handler for devices/{id}/telemetry. It runs on the
// device's connection goroutine, so it never waits: it takes a token from
// the device's own bucket, parses and bounds the message (Parse), and hands
// it to the queue. Nothing on that path is shared with other devices but the
// device map (a sync.Map, read without locking once the device is known) and
// the queue's channel, so a device flooding telemetry slows only itself.
//
// A device over its rate is sampled: the excess is dropped and counted, and
// one rejected event per device per minute says how many were dropped. A
// message that is refused, whole or in part, is recorded as one rejected
// event per session, whatever the number of messages. Handle never returns an
// error: a device made to resend its telemetry would only add to the load.
type Ingest struct {
	q      Queue
	events EventSink
	opts   IngestOptions
	now    func() time.Time
	log    *slog.Logger

	devices sync.Map // device id → *device

	// Counted for the summary line, logged at most once per reportEvery.
	sampledSince, refusedSince atomic.Int64

	mReceived prometheus.Counter
	mSampled  prometheus.Counter
	mRefused  *prometheus.CounterVec
	// The children of mRefused, resolved once rather than per message.
	mRefusedNone, mRefusedPart prometheus.Counter
}

// device is what Ingest keeps per device. Its mutex is taken only by the
// device's own goroutine (two during a takeover), which parses under it
// (a bounded time, MaxPayload), and, briefly, by the sweep and by a
// disconnect's SessionLink.
type device struct {
	mu      sync.Mutex
	limiter *rate.Limiter
	session Session   // the latest, for the sweep's report
	seen    time.Time // last message
	last    time.Time // At of the last entry
	// problemEpoch is the session whose refused message was recorded.
	problemEpoch int64
	problem      bool
	// dropped counts the messages sampled away since the last report, at
	// reported.
	dropped  int64
	reported time.Time
	// known holds the metric names kept (at most MaxNames) and the link's
	// strings, which the device's messages share (see parse).
	known known
	link  sessionLink
}

// NewIngest builds the handler; q is where parsed messages go, events where
// rejected events go.
func NewIngest(q Queue, events EventSink, opts IngestOptions) *Ingest {
	orDefault(&opts.Rate, 1)
	orDefault(&opts.Burst, 10)
	orDefault(&opts.MaxNames, 64)
	orDefault(&opts.Logger, slog.New(slog.DiscardHandler))
	in := &Ingest{q: q, events: events, opts: opts, now: opts.Now, log: opts.Logger}
	if in.now == nil {
		in.now = time.Now
	}
	in.mReceived = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_telemetry_received_total", Help: "Telemetry messages received from devices."})
	in.mSampled = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_telemetry_sampled_total",
		Help: "Telemetry messages dropped because their device sent above its rate (telemetry-rate, telemetry-burst)."})
	in.mRefused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetd_telemetry_refused_total",
		Help: "Telemetry messages refused at the edge, by what was kept: none (malformed) or part (a field refused)."}, []string{"kept"})
	in.mRefusedNone, in.mRefusedPart = in.mRefused.WithLabelValues("none"), in.mRefused.WithLabelValues("part")
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(in.mReceived, in.mSampled, in.mRefused)
	}
	return in
}

// Handle takes one telemetry message (see Ingest). It always returns nil.
func (in *Ingest) Handle(s Session, payload []byte) error {
	in.mReceived.Inc()
	now := in.now()
	d := in.device(s.DeviceID, now)

	d.mu.Lock()
	d.session, d.seen = s, now
	if !d.limiter.AllowN(now, 1) {
		d.dropped++
		n := d.takeReport(now)
		d.mu.Unlock()
		in.mSampled.Inc()
		in.sampledSince.Add(1)
		if n > 0 {
			in.reportSampled(s, now, n)
		}
		return nil
	}
	msg, err := parse(payload, &d.known)
	if names := d.admitNames(&msg, in.opts.MaxNames); names > 0 {
		why := fmt.Sprintf("%d new metric names past the %d this device may use were left out", names, in.opts.MaxNames)
		if err != nil {
			err = errors.New(err.Error() + "; " + why)
		} else {
			err = errors.New("message partly kept: " + why)
		}
	}
	record := err != nil && !(d.problem && d.problemEpoch == s.Epoch)
	if record {
		d.problem, d.problemEpoch = true, s.Epoch
	}
	var at time.Time
	if !msg.Empty() {
		d.link.note(s.Epoch, &msg, now)
		at = now.Round(0).Truncate(time.Microsecond)
		if !at.After(d.last) {
			at = d.last.Add(time.Microsecond)
		}
		d.last = at
	}
	d.mu.Unlock()

	if err != nil {
		if msg.Empty() {
			in.mRefusedNone.Inc()
		} else {
			in.mRefusedPart.Inc()
		}
		in.refusedSince.Add(1)
		if record {
			in.reject(s, now, "telemetry "+err.Error()+" (reported once per session)")
		}
	}
	if !msg.Empty() {
		in.q.Enqueue(Entry{DeviceID: s.DeviceID, At: at, Message: msg}) // a full queue counts its drops
	}
	return nil
}

// device returns the state of a device, creating it on its first message.
func (in *Ingest) device(id string, now time.Time) *device {
	if v, ok := in.devices.Load(id); ok {
		return v.(*device)
	}
	lim := rate.Limit(in.opts.Rate)
	if in.opts.Rate < 0 {
		lim = rate.Inf
	}
	d := &device{limiter: rate.NewLimiter(lim, in.opts.Burst), seen: now}
	v, _ := in.devices.LoadOrStore(id, d)
	return v.(*device)
}

// takeReport returns how many dropped messages to report now, and starts a
// new report period, or returns 0 while the current one lasts: the first drop
// is reported at once, the ones after it at most once per reportEvery (by the
// next drop, or by the sweep when the flood stopped). d.mu is held.
func (d *device) takeReport(now time.Time) int64 {
	if d.dropped == 0 || (!d.reported.IsZero() && now.Sub(d.reported) < reportEvery) {
		return 0
	}
	n := d.dropped
	d.dropped, d.reported = 0, now
	return n
}

// admitNames removes from msg the metrics whose names would take the device
// past max distinct names, and returns how many it removed. d.mu is held.
// A name that parse found known is the same string as d.known's, so the
// comparison ends at the pointer.
func (d *device) admitNames(msg *Message, max int) int {
	kept, refused := msg.Metrics[:0], 0
	for _, m := range msg.Metrics {
		known := false
		for _, n := range d.known.names {
			if n == m.Name {
				known = true
				break
			}
		}
		if !known {
			if len(d.known.names) >= max {
				refused++
				continue
			}
			d.known.names = append(d.known.names, m.Name)
		}
		kept = append(kept, m)
	}
	msg.Metrics = kept
	return refused
}

func (in *Ingest) reportSampled(s Session, now time.Time, n int64) {
	unit := "messages"
	if n == 1 {
		unit = "message"
	}
	in.reject(s, now, fmt.Sprintf("telemetry sampled: %d %s dropped (above %g messages/s, burst %d; reported at most once a minute)",
		n, unit, in.opts.Rate, in.opts.Burst))
}

// reject records a rejected event for the session.
func (in *Ingest) reject(s Session, now time.Time, why string) {
	why = untrusted.Text(why, 300)
	in.events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: s.DeviceID, At: now, Kind: fleet.KindRejected,
		Detail: why, Firmware: s.Firmware, Model: s.Model, SessionEpoch: s.Epoch, BrokerNode: in.opts.Node})
	in.log.Debug("telemetry rejected", "device_id", s.DeviceID, "why", why)
}

// Run sweeps the device states every ten seconds until ctx ends: it reports
// drops a sampled device made since its last report once the minute is up
// (so that the count of a flood that stopped is not lost), forgets devices
// idle for an hour, and logs the summary of sampled and refused messages at
// most once a minute.
func (in *Ingest) Run(ctx context.Context) {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	var logged time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := in.now()
		in.Sweep(now)
		if now.Sub(logged) >= reportEvery {
			logged = now
			in.logSummary()
		}
	}
}

// Sweep is one round of Run, at now.
func (in *Ingest) Sweep(now time.Time) {
	in.devices.Range(func(k, v any) bool {
		d := v.(*device)
		d.mu.Lock()
		n := d.takeReport(now)
		s := d.session
		idle := d.dropped == 0 && now.Sub(d.seen) > idleAfter
		d.mu.Unlock()
		if n > 0 {
			in.reportSampled(s, now, n)
		}
		if idle {
			in.devices.CompareAndDelete(k, v)
		}
		return true
	})
}

func (in *Ingest) logSummary() {
	sampled, refused := in.sampledSince.Swap(0), in.refusedSince.Swap(0)
	if sampled == 0 && refused == 0 {
		return
	}
	in.log.Warn("telemetry not all stored: devices above their rate were sampled, or sent messages that were refused (rejected events name the devices)",
		"sampled", sampled, "refused", refused, "since", reportEvery.String(), "rate", in.opts.Rate, "burst", in.opts.Burst)
}
