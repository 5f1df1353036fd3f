package command

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/inputguard"
	"github.com/fleetd/fleetd/internal/pending"
)

// Sender delivers messages to devices wherever they are connected
// (cluster.Router: through this replica's broker, or the replica holding the
// session).
type Sender interface {
	// SendRequest publishes payload on devices/{id}/{sub} with QoS 1; MQTT 5
	// sessions also get devices/{id}/{responseSub} as Response Topic and
	// correlation as Correlation Data.
	SendRequest(deviceID, sub string, payload []byte, responseSub string, correlation []byte) error
	// Listening reports whether the device has a live session subscribed to
	// a filter that matches devices/{id}/{sub}, here or on another replica.
	Listening(deviceID, sub string) bool
}

// EventSink takes the rejected events of refused responses, without
// blocking (fleet.Recorder).
type EventSink interface {
	Record(fleet.Event)
}

// Options tune the service. Zero fields take the defaults in brackets.
type Options struct {
	// Limits bound requests and responses (DefaultLimits).
	Limits Limits
	// Retention is how long finished commands are kept [7 days];
	// KeepPerDevice how many of a device's finished commands are kept at
	// most [100].
	Retention     time.Duration
	KeepPerDevice int
	// SweepInterval is how often timeouts and expiry are applied [1 s];
	// PruneInterval how often retention is [1 min].
	SweepInterval, PruneInterval time.Duration
	// PollInterval is how often a waiting GET reads the database, in case the
	// other replicas' signal was lost [500 ms]; MaxWait caps ?wait [60 s].
	PollInterval, MaxWait time.Duration
	// ResponseRate and ResponseBurst bound the responses per second one
	// device's session has looked up [10, burst 20]; the excess is
	// acknowledged and dropped.
	ResponseRate  float64
	ResponseBurst int
	// Node names this replica in events.
	Node string
	// Now is the clock [time.Now]; replicas pass the database's.
	Now        func() time.Time
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

func (o *Options) defaults() {
	o.Limits = o.Limits.withDefaults()
	def := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&o.Retention, 7*24*time.Hour)
	def(&o.SweepInterval, time.Second)
	def(&o.PruneInterval, time.Minute)
	def(&o.PollInterval, 500*time.Millisecond)
	def(&o.MaxWait, 60*time.Second)
	if o.KeepPerDevice == 0 {
		o.KeepPerDevice = 100
	}
	if o.ResponseRate == 0 {
		o.ResponseRate = 10
	}
	if o.ResponseBurst == 0 {
		o.ResponseBurst = 20
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Change is a command's new state, for live views and waiting requests.
type Change struct {
	ID       string    `json:"id"`
	DeviceID string    `json:"device_id"`
	Name     string    `json:"name"`
	State    State     `json:"state"`
	At       time.Time `json:"at"`
	BulkID   string    `json:"bulk_id,omitempty"`
}

// Service runs single-device commands: Create stores and delivers, the
// broker's hooks call DeviceListening (redelivery) and HandleResponse
// (answers), Run applies timeouts, expiry and retention, Wait long-polls.
type Service struct {
	store  *Store
	send   Sender
	events EventSink
	opts   Options
	log    *slog.Logger

	notes    *pending.IDs
	waiters  waiters
	onChange func(Change)
	// bulkChanged is told the bulk of every command that changed here
	// (Bulks, when there is one).
	bulkChanged func(bulkID string)
	responses   *inputguard.Guard

	m metrics
}

type metrics struct {
	created   prometheus.Counter
	finished  *prometheus.CounterVec
	responses *prometheus.CounterVec
}

// NewService builds the service on the store.
func NewService(store *Store, send Sender, events EventSink, opts Options) *Service {
	opts.defaults()
	s := &Service{store: store, send: send, events: events, opts: opts, log: opts.Logger, notes: pending.New(),
		onChange: func(Change) {}, bulkChanged: func(string) {}}
	s.waiters.m = map[string]map[chan struct{}]struct{}{}
	s.m = metrics{
		created: prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_commands_created_total", Help: "Commands created through the API."}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetd_commands_finished_total",
			Help: "Commands finished, by state (succeeded, failed, timed_out, expired), on this replica."}, []string{"state"}),
		responses: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetd_command_responses_total",
			Help: "Command responses from devices, by result: settled, or refused (malformed, unknown, other_device, finished, rate)."}, []string{"result"}),
	}
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(s.m.created, s.m.finished, s.m.responses)
	}
	s.responses = inputguard.New(inputguard.Options{What: "command response", Rate: opts.ResponseRate, Burst: opts.ResponseBurst,
		Count: func(r string) { s.m.responses.WithLabelValues(r).Inc() }, Events: events, Node: opts.Node, Now: opts.Now, Logger: opts.Logger})
	return s
}

// OnChange registers f, called after the commit with every state change
// made on this replica. f must not block. Call before Run.
func (s *Service) OnChange(f func(Change)) { s.onChange = f }

// Changed tells the service that another replica changed a command: the
// requests waiting for it here look again.
func (s *Service) Changed(id string) { s.waiters.wake(id) }

func (s *Service) changed(c Command) {
	if c.State.Final() {
		s.m.finished.WithLabelValues(string(c.State)).Inc()
	}
	s.waiters.wake(c.ID)
	if c.BulkID != "" {
		s.bulkChanged(c.BulkID)
	}
	s.onChange(Change{ID: c.ID, DeviceID: c.DeviceID, Name: c.Name, State: c.State, At: c.UpdatedAt, BulkID: c.BulkID})
}

// Limits returns the limits in force, defaults filled in.
func (s *Service) Limits() Limits { return s.opts.Limits }

// Create validates a request, stores the command and delivers it at once
// when the device listens. It returns a *ValidationError naming the field
// that is wrong, an error wrapping fleet.ErrNotFound for an unknown device,
// ErrGone for a decommissioned one and ErrTooMany past the device's pending
// commands.
func (s *Service) Create(ctx context.Context, deviceID string, r Request) (Command, error) {
	r, err := r.Normalize(s.opts.Limits)
	if err != nil {
		return Command{}, err
	}
	c, err := s.store.Create(ctx, deviceID, r, s.opts.Limits.MaxPending, s.opts.Now())
	if err != nil {
		return Command{}, err
	}
	s.m.created.Inc()
	s.changed(c)
	return s.deliver(ctx, c), nil
}

// Get returns a device's command, or an error wrapping ErrNotFound.
func (s *Service) Get(ctx context.Context, deviceID, id string) (Command, error) {
	return s.store.Get(ctx, deviceID, id)
}

// MaxList caps a listing page.
const MaxList = 200

// List returns a page of a device's commands, newest first, and the cursor
// of the next page (nil on the last).
func (s *Service) List(ctx context.Context, deviceID string, after *Cursor, limit int) ([]Command, *Cursor, error) {
	if limit <= 0 {
		limit = 50
	}
	limit = min(limit, MaxList)
	cs, err := s.store.List(ctx, deviceID, after, limit)
	if err != nil || len(cs) < limit {
		return cs, nil, err
	}
	last := cs[len(cs)-1]
	return cs, &Cursor{At: last.CreatedAt, ID: last.ID}, nil
}

// Run applies timeouts and expiry every SweepInterval, retention every
// PruneInterval, and redelivers to devices that subscribed, until ctx ends.
func (s *Service) Run(ctx context.Context) {
	sweep := time.NewTicker(s.opts.SweepInterval)
	defer sweep.Stop()
	prune := time.NewTicker(s.opts.PruneInterval)
	defer prune.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.notes.Wake():
			s.redeliverNoted(ctx)
		case <-sweep.C:
			s.Sweep(ctx)
		case <-prune.C:
			s.Prune(ctx)
			s.responses.ForgetIdle(s.opts.Now())
		}
	}
}
