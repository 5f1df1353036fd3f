package devconfig

import (
	"context"
	"encoding/json"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/inputguard"
	"github.com/fleetd/fleetd/internal/pending"
)

// Topics under devices/{id}/.
const (
	// DesiredSub is where a device gets its effective desired document,
	// retained.
	DesiredSub = "config/desired"
	// ReportedSub is where a device reports the configuration it applied.
	ReportedSub = "config/reported"
)

// Sender publishes on this replica's broker (broker.Broker). Each replica
// publishes to the sessions it holds: a change made elsewhere reaches it as
// a signal (Changed), a device that subscribes here is published to from
// the database.
type Sender interface {
	// Listening reports whether the device has a live session here
	// subscribed to a filter that matches devices/{id}/{sub}.
	Listening(deviceID, sub string) bool
	// SendRetained publishes payload on devices/{id}/{sub}, QoS 1,
	// retained while the device's session lasts here.
	SendRetained(deviceID, sub string, payload []byte) error
}

// EventSink takes the rejected events of refused reports, without
// blocking (fleet.Recorder).
type EventSink interface {
	Record(fleet.Event)
}

// Options tune the service. Zero fields take the defaults in brackets.
type Options struct {
	// Limits bound documents and reports (DefaultLimits).
	Limits Limits
	// MaxLayers is how many layers there may be [1000].
	MaxLayers int
	// ResolveInterval is how often stale devices are looked for, besides
	// at once after a layer change made here [1 s].
	ResolveInterval time.Duration
	// ReportRate and ReportBurst bound the reports per second one device's
	// session has stored [1, burst 10]; the excess is acknowledged and
	// dropped.
	ReportRate  float64
	ReportBurst int
	// Node names this replica in events.
	Node string
	// Now is the clock [time.Now]; replicas pass the database's.
	Now        func() time.Time
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

func (o *Options) defaults() {
	o.Limits = o.Limits.withDefaults()
	if o.MaxLayers <= 0 {
		o.MaxLayers = 1000
	}
	if o.ResolveInterval <= 0 {
		o.ResolveInterval = time.Second
	}
	if o.ReportRate <= 0 {
		o.ReportRate = 1
	}
	if o.ReportBurst <= 0 {
		o.ReportBurst = 10
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Service keeps devices' desired configuration and takes their reports:
// the API changes layers and devices' own layers, Run re-resolves the
// devices a layer change touched and publishes new versions to the
// sessions here, the broker's hooks call DeviceListening (publish on
// subscribe) and HandleReport.
type Service struct {
	store  *Store
	send   Sender
	events EventSink
	opts   Options
	log    *slog.Logger

	notes *pending.IDs
	wake  chan struct{}
	// here are the devices that subscribed on this replica and may still
	// listen here, for Resync; publishNoted forgets those that do not.
	hereMu   sync.Mutex
	here     map[string]struct{}
	onChange func(ids []string)
	reports  *inputguard.Guard

	m metrics
}

type metrics struct {
	published prometheus.Counter
	resolved  prometheus.Counter
	versions  prometheus.Counter
	reports   *prometheus.CounterVec
}

// NewService builds the service.
func NewService(store *Store, send Sender, events EventSink, opts Options) *Service {
	opts.defaults()
	s := &Service{store: store, send: send, events: events, opts: opts, log: opts.Logger,
		notes: pending.New(), wake: make(chan struct{}, 1), onChange: func([]string) {}, here: map[string]struct{}{}}
	s.m = metrics{
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_config_published_total",
			Help: "Desired configuration documents published to devices' sessions on this replica."}),
		resolved: prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_config_resolved_total",
			Help: "Devices whose effective desired configuration this replica re-resolved."}),
		versions: prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_config_versions_total",
			Help: "New versions of devices' effective desired configuration made by this replica."}),
		reports: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetd_config_reports_total",
			Help: "Configuration reports from devices, by result (stored, rate, malformed, ahead)."}, []string{"result"}),
	}
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(s.m.published, s.m.resolved, s.m.versions, s.m.reports)
	}
	s.reports = inputguard.New(inputguard.Options{What: "configuration report", Rate: opts.ReportRate, Burst: opts.ReportBurst,
		Count: func(r string) { s.m.reports.WithLabelValues(r).Inc() }, Events: events, Node: opts.Node, Now: opts.Now, Logger: opts.Logger})
	return s
}

// OnChange sets the function told of devices whose effective document got
// a new version here, for the other replicas (call it before Run). It must
// not block.
func (s *Service) OnChange(f func(ids []string)) { s.onChange = f }

// Changed takes the devices another replica gave a new version: those with
// a session here get it. It never blocks.
func (s *Service) Changed(ids []string) {
	for _, id := range ids {
		s.notes.Add(id)
	}
}

// DeviceListening notes that a device subscribed to its desired topic: it
// is sent its document from the database. It never blocks (a broker hook).
func (s *Service) DeviceListening(deviceID string) {
	s.hereMu.Lock()
	s.here[deviceID] = struct{}{}
	s.hereMu.Unlock()
	s.notes.Add(deviceID)
}

// Resync sends every device that listens here its document again, for
// when this replica may have missed other replicas' signals (the bus's
// listening connection was down). It never blocks.
func (s *Service) Resync() {
	s.hereMu.Lock()
	ids := make([]string, 0, len(s.here))
	for id := range s.here {
		ids = append(ids, id)
	}
	s.hereMu.Unlock()
	for _, id := range ids {
		s.notes.Add(id)
	}
}

// changed tells this replica's publisher and the other replicas.
func (s *Service) changed(cs []Changed) {
	if len(cs) == 0 {
		return
	}
	s.m.versions.Add(float64(len(cs)))
	ids := make([]string, len(cs))
	for i, c := range cs {
		ids[i] = c.DeviceID
		s.notes.Add(c.DeviceID)
	}
	s.onChange(ids)
}

// View is a device's configuration as the API shows it.
type View struct {
	DeviceID string      `json:"device_id"`
	Desired  DesiredView `json:"desired"`
	// Device is the device's own layer, the last one applied.
	Device         Doc   `json:"device"`
	DeviceRevision int64 `json:"device_revision"`
	// Reported is the device's latest report; nil before its first.
	Reported *Reported `json:"reported"`
	// Sync is unreported (no report yet), stale (the report is of an
	// older version), differs (the current version, with other values) or
	// in_sync (the current version, and every desired value as desired).
	Sync   string `json:"sync"`
	InSync bool   `json:"in_sync"`
	// Diff lists where the report differs from the desired document.
	Diff []Difference `json:"diff"`
	// Problem says why the desired document could not follow the layers.
	Problem string `json:"problem,omitempty"`
}

// DesiredView is the effective desired document and where it came from.
type DesiredView struct {
	Version int64 `json:"version"`
	Config  Doc   `json:"config"`
	// Sources are the layers merged into it, in order ("fleet",
	// "model:gw-100", …, "device").
	Sources   []string   `json:"sources"`
	ChangedAt *time.Time `json:"changed_at"`
}

// Sync states of View.
const (
	SyncUnreported = "unreported"
	SyncStale      = "stale"
	SyncDiffers    = "differs"
	SyncInSync     = "in_sync"
)

// Describe turns a stored configuration into what the API shows: the
// difference between desired and reported and whether they are in sync. A
// report may hold keys the desired document does not (the device's own
// settings): they are listed as extra and do not break the sync.
func Describe(d Device) View {
	v := View{DeviceID: d.DeviceID, Device: d.Layer, DeviceRevision: d.LayerRevision, Reported: d.Reported, Problem: d.Problem,
		Desired: DesiredView{Version: d.Version, Config: d.Effective, Sources: d.Sources, ChangedAt: d.ChangedAt},
		Diff:    []Difference{}, Sync: SyncUnreported}
	if v.Device == nil {
		v.Device = Doc{}
	}
	if v.Desired.Config == nil {
		v.Desired.Config = Doc{}
	}
	if v.Desired.Sources == nil {
		v.Desired.Sources = []string{}
	}
	if d.Reported == nil {
		return v
	}
	if diff := Diff(v.Desired.Config, d.Reported.Config); diff != nil {
		v.Diff = diff
	}
	switch {
	case d.Reported.Version < d.Version:
		v.Sync = SyncStale
	default:
		v.Sync = SyncInSync
		for _, x := range v.Diff {
			if x.Kind != DiffExtra {
				v.Sync = SyncDiffers
				break
			}
		}
	}
	v.InSync = v.Sync == SyncInSync
	return v
}

// Get returns a device's configuration, resolving it first if a change
// awaits. It returns an error wrapping fleet.ErrNotFound for an unknown
// device.
func (s *Service) Get(ctx context.Context, id string) (View, error) {
	d, err := s.store.Get(ctx, id)
	if err != nil {
		return View{}, err
	}
	if d.Stale {
		cs, err := s.store.ResolveDevices(ctx, []string{id}, s.opts.Now())
		if err != nil {
			return View{}, err
		}
		s.changed(cs)
		if d, err = s.store.Get(ctx, id); err != nil {
			return View{}, err
		}
	}
	return Describe(d), nil
}

// PutDevice replaces a device's own layer with doc. It returns a
// *ValidationError (field "config") for a document that is not an object
// within the limits, and errors wrapping fleet.ErrNotFound and ErrGone.
func (s *Service) PutDevice(ctx context.Context, id string, doc json.RawMessage) (View, error) {
	d, err := parse(doc, "config", kindLayer, s.opts.Limits.MaxDocument, s.opts.Limits)
	if err != nil {
		return View{}, err
	}
	return s.updateDevice(ctx, id, func(Doc) (Doc, error) { return d, nil })
}

// PatchDevice applies an RFC 7396 merge patch to a device's own layer.
// Errors are those of PutDevice; the patched layer must be within the
// limits too.
func (s *Service) PatchDevice(ctx context.Context, id string, patch json.RawMessage) (View, error) {
	p, err := parse(patch, "config", kindPatch, s.opts.Limits.MaxDocument, s.opts.Limits)
	if err != nil {
		return View{}, err
	}
	return s.updateDevice(ctx, id, func(cur Doc) (Doc, error) { return s.patched(cur, p) })
}

func (s *Service) patched(cur, patch Doc) (Doc, error) {
	out, err := MergePatch(cur, Encode(patch))
	if err != nil {
		return nil, invalid("config", "cannot apply the merge patch: %s", clip(err.Error(), 80))
	}
	obj, ok := out.(map[string]any)
	if !ok {
		return nil, invalid("config", "the merge patch must be a JSON object")
	}
	// Check the result as a whole: a patch within the limits can still
	// take a document past them.
	return parse(Encode(obj), "config", kindLayer, s.opts.Limits.MaxDocument, s.opts.Limits)
}

func (s *Service) updateDevice(ctx context.Context, id string, update func(Doc) (Doc, error)) (View, error) {
	cs, err := s.store.UpdateDevice(ctx, id, update, s.opts.Now())
	if err != nil {
		return View{}, err
	}
	s.changed(cs)
	d, err := s.store.Get(ctx, id)
	if err != nil {
		return View{}, err
	}
	return Describe(d), nil
}

// LayerChange is a layer as changed, and how many devices it applies to
// (they are re-resolved within about a second).
type LayerChange struct {
	Layer   *Layer `json:"layer,omitempty"`
	Devices int64  `json:"devices"`
}

// Layers returns every layer, in the order they apply.
func (s *Service) Layers(ctx context.Context) ([]Layer, error) { return s.store.Layers(ctx) }

// Layer returns one layer. It returns a *ValidationError for a malformed
// scope and an error wrapping ErrNotFound.
func (s *Service) Layer(ctx context.Context, scope string) (Layer, error) {
	sc, err := ParseScope(scope)
	if err != nil {
		return Layer{}, err
	}
	return s.store.Layer(ctx, sc)
}

// PutLayer replaces (or creates) a layer. It returns a *ValidationError
// naming "scope" or "config".
func (s *Service) PutLayer(ctx context.Context, scope string, doc json.RawMessage) (LayerChange, error) {
	sc, err := ParseScope(scope)
	if err != nil {
		return LayerChange{}, err
	}
	d, err := parse(doc, "config", kindLayer, s.opts.Limits.MaxDocument, s.opts.Limits)
	if err != nil {
		return LayerChange{}, err
	}
	return s.updateLayer(ctx, sc, func(Doc) (Doc, error) { return d, nil })
}

// PatchLayer applies an RFC 7396 merge patch to a layer (an absent layer
// is patched from {}). Errors are those of PutLayer.
func (s *Service) PatchLayer(ctx context.Context, scope string, patch json.RawMessage) (LayerChange, error) {
	sc, err := ParseScope(scope)
	if err != nil {
		return LayerChange{}, err
	}
	p, err := parse(patch, "config", kindPatch, s.opts.Limits.MaxDocument, s.opts.Limits)
	if err != nil {
		return LayerChange{}, err
	}
	return s.updateLayer(ctx, sc, func(cur Doc) (Doc, error) { return s.patched(cur, p) })
}

func (s *Service) updateLayer(ctx context.Context, sc Scope, update func(Doc) (Doc, error)) (LayerChange, error) {
	l, n, err := s.store.UpdateLayer(ctx, sc, update, s.opts.MaxLayers, s.opts.Now())
	if err != nil {
		return LayerChange{}, err
	}
	s.kick()
	return LayerChange{Layer: &l, Devices: n}, nil
}

// DeleteLayer removes a layer. It returns a *ValidationError for a
// malformed scope and an error wrapping ErrNotFound.
func (s *Service) DeleteLayer(ctx context.Context, scope string) (LayerChange, error) {
	sc, err := ParseScope(scope)
	if err != nil {
		return LayerChange{}, err
	}
	n, err := s.store.DeleteLayer(ctx, sc)
	if err != nil {
		return LayerChange{}, err
	}
	s.kick()
	return LayerChange{Devices: n}, nil
}

func (s *Service) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Run re-resolves stale devices and publishes new versions and documents
// asked for on subscribe until ctx ends.
func (s *Service) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.publishLoop(ctx)
	}()
	t := time.NewTicker(s.opts.ResolveInterval)
	defer t.Stop()
	forget := time.NewTicker(time.Minute)
	defer forget.Stop()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			return
		case <-forget.C:
			s.reports.ForgetIdle(s.opts.Now())
		case <-s.wake:
			s.resolveStale(ctx)
		case <-t.C:
			s.resolveStale(ctx)
		}
	}
}

// resolveStale re-resolves stale devices batch by batch until none is left
// that another replica is not already resolving.
func (s *Service) resolveStale(ctx context.Context) {
	for ctx.Err() == nil {
		n, cs, err := s.store.ResolveStale(ctx, s.opts.Now())
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("cannot re-resolve devices' configuration; retried in a second", "err", err)
			}
			return
		}
		s.m.resolved.Add(float64(n))
		s.changed(cs)
		if n < resolveBatch {
			return
		}
	}
}

func (s *Service) publishLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.notes.Wake():
			s.publishNoted(ctx)
		}
	}
}

// publishBatch bounds the devices one read of desired documents covers.
const publishBatch = 500

// publishNoted sends the noted devices that listen here their desired
// document, resolving first those that await it.
func (s *Service) publishNoted(ctx context.Context) {
	ids := s.notes.Take()
	for len(ids) > 0 && ctx.Err() == nil {
		n := min(len(ids), publishBatch)
		var here []string
		for _, id := range ids[:n] {
			if s.send.Listening(id, DesiredSub) {
				here = append(here, id)
				continue
			}
			s.hereMu.Lock()
			delete(s.here, id)
			s.hereMu.Unlock()
		}
		ids = ids[n:]
		if len(here) == 0 {
			continue
		}
		ds, err := s.store.Desired(ctx, here)
		if err == nil {
			var stale []string
			for _, d := range ds {
				if d.Stale {
					stale = append(stale, d.DeviceID)
				}
			}
			if len(stale) > 0 {
				var cs []Changed
				if cs, err = s.store.ResolveDevices(ctx, stale, s.opts.Now()); err == nil {
					s.m.versions.Add(float64(len(cs)))
					if len(cs) > 0 {
						changedIDs := make([]string, len(cs))
						for i, c := range cs {
							changedIDs[i] = c.DeviceID
						}
						s.onChange(changedIDs)
					}
					ds, err = s.store.Desired(ctx, here)
				}
			}
		}
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("cannot read devices' desired configuration; they get it when they subscribe again", "devices", len(here), "err", err)
			}
			continue
		}
		for _, d := range ds {
			if err := s.send.SendRetained(d.DeviceID, DesiredSub, d.Payload()); err != nil {
				s.log.Warn("desired configuration not sent; it is sent when the device subscribes again", "device_id", d.DeviceID, "err", err)
				continue
			}
			s.m.published.Inc()
		}
	}
}
