package command

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/Masterminds/semver/v3"

	"github.com/fleetd/fleetd/fleet"
)

// Fleet selects a bulk's devices (fleet.Service, as campaigns do).
type Fleet interface {
	Candidates(ctx context.Context, models, tags []string, incompatibleOnly bool) ([]fleet.Candidate, error)
}

// BulkOptions tune bulk commands. Zero fields take the defaults in brackets.
type BulkOptions struct {
	// MaxDevices caps the devices one bulk may select [100 000]; MaxRunning
	// the bulks running at once [10].
	MaxDevices, MaxRunning int
	// Interval is how often running bulks are stepped [250 ms]; a command of
	// a bulk finishing on this replica steps them sooner.
	Interval time.Duration
}

// BulkChange is a bulk's progress, for live views (small enough for a
// replica signal: no params).
type BulkChange struct {
	ID     string    `json:"id"`
	Name   string    `json:"name"`
	State  BulkState `json:"state"`
	Total  int       `json:"total"`
	Counts Counts    `json:"counts"`
	At     time.Time `json:"at"`
}

// Bulks sends one command to many devices: Create selects the devices and
// stores the bulk, Run paces it (every replica runs it; each bulk is
// stepped by one at a time) and publishes progress, Cancel stops it. Each
// device's command is an ordinary command of the Service.
type Bulks struct {
	svc   *Service
	store *Store
	fleet Fleet
	opts  BulkOptions

	mu       sync.Mutex
	dirty    map[string]struct{}
	wake     chan struct{}
	onChange func(BulkChange)
}

// NewBulks builds bulk commands on the service. Call it before the service
// runs: it hooks into the service's changes.
func NewBulks(svc *Service, f Fleet, opts BulkOptions) *Bulks {
	if opts.MaxDevices == 0 {
		opts.MaxDevices = 100000
	}
	if opts.MaxRunning == 0 {
		opts.MaxRunning = 10
	}
	if opts.Interval == 0 {
		opts.Interval = 250 * time.Millisecond
	}
	b := &Bulks{svc: svc, store: svc.store, fleet: f, opts: opts, dirty: map[string]struct{}{}, wake: make(chan struct{}, 1),
		onChange: func(BulkChange) {}}
	svc.bulkChanged = b.noteChanged
	return b
}

// OnChange registers f, called with the progress of every bulk that
// changed on this replica, at most once per step each. f must not block.
// Call before Run.
func (b *Bulks) OnChange(f func(BulkChange)) { b.onChange = f }

func (b *Bulks) noteChanged(id string) {
	b.mu.Lock()
	b.dirty[id] = struct{}{}
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// Create validates a request, selects the active devices its selector
// matches now (in id order) and stores the bulk, running; the pacer sends
// its first batch at once. It returns a *ValidationError naming the field
// that is wrong (selector when it matches no device, or more than
// MaxDevices), and an error wrapping ErrTooManyBulks when MaxRunning bulks
// are running.
func (b *Bulks) Create(ctx context.Context, r BulkRequest) (Bulk, error) {
	r, err := r.Normalize(b.svc.opts.Limits)
	if err != nil {
		return Bulk{}, err
	}
	sel := r.Selector
	models := sel.Models
	if models == nil {
		models = []string{} // all models: a nil array would be SQL NULL and match none
	}
	cands, err := b.fleet.Candidates(ctx, models, sel.Tags, sel.Compat == "incompatible")
	if err != nil {
		return Bulk{}, err
	}
	var constraint *semver.Constraints
	if sel.Version != "" {
		constraint, _ = semver.NewConstraint(sel.Version) // Normalize checked it
	}
	var ids []string
	for _, c := range cands {
		if sel.matches(constraint, c.Firmware) {
			ids = append(ids, c.ID)
		}
	}
	switch {
	case len(ids) == 0:
		return Bulk{}, invalid("selector", "matches no active device")
	case len(ids) > b.opts.MaxDevices:
		return Bulk{}, invalid("selector", "matches %d devices; a bulk command may select at most %d", len(ids), b.opts.MaxDevices)
	}
	bulk, err := b.store.CreateBulk(ctx, r, ids, b.opts.MaxRunning, b.svc.opts.Now())
	if err != nil {
		return Bulk{}, err
	}
	b.noteChanged(bulk.ID)
	return bulk, nil
}

// Get returns a bulk and its summary, or an error wrapping ErrNotFound.
func (b *Bulks) Get(ctx context.Context, id string) (Bulk, error) { return b.store.GetBulk(ctx, id) }

// List returns a page of bulks, newest first, and the next page's cursor
// (nil on the last).
func (b *Bulks) List(ctx context.Context, after *Cursor, limit int) ([]Bulk, *Cursor, error) {
	if limit <= 0 {
		limit = 50
	}
	limit = min(limit, MaxList)
	bs, err := b.store.ListBulks(ctx, after, limit)
	if err != nil || len(bs) < limit {
		return bs, nil, err
	}
	last := bs[len(bs)-1]
	return bs, &Cursor{At: last.CreatedAt, ID: last.ID}, nil
}

// Devices returns a page of a bulk's devices with their results, in id
// order, after position after (-1: from the first), only those in state
// when it is not empty (one of TargetStates), and the position the next
// page starts after (-1 on the last). It returns a *ValidationError for an
// unknown state and an error wrapping ErrNotFound for an unknown bulk.
func (b *Bulks) Devices(ctx context.Context, id, state string, after, limit int) ([]BulkTarget, int, error) {
	if state != "" && !contains(TargetStates, state) {
		return nil, -1, invalid("state", "%q is not a state of a bulk's device (one of %v)", clip(state, 20), TargetStates)
	}
	if limit <= 0 {
		limit = 50
	}
	limit = min(limit, MaxList)
	ts, err := b.store.Targets(ctx, id, state, after, limit)
	if err != nil || len(ts) < limit {
		return ts, -1, err
	}
	return ts, ts[len(ts)-1].Position, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Cancel stops a running bulk: nothing more is sent, its devices not sent
// yet count as cancelled and its queued commands expire (Store.CancelBulk).
// It returns errors wrapping ErrNotFound and ErrFinished.
func (b *Bulks) Cancel(ctx context.Context, id string) (Bulk, error) {
	bulk, expired, err := b.store.CancelBulk(ctx, id, b.svc.opts.Now())
	for _, c := range expired {
		b.svc.changed(c)
	}
	if err == nil {
		b.noteChanged(bulk.ID)
	}
	return bulk, err
}

// Run steps the running bulks every Interval, and soon after one of their
// commands changes here, then publishes the progress of the bulks that
// changed, until ctx ends.
func (b *Bulks) Run(ctx context.Context) {
	tick := time.NewTicker(b.opts.Interval)
	defer tick.Stop()
	gap := b.opts.Interval / 10
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-b.wake:
		}
		b.Step(ctx)
		b.publish(ctx)
		// A wave of answers wakes the loop for each; stepping at most every
		// tenth of an interval makes it one step per wave.
		select {
		case <-ctx.Done():
			return
		case <-time.After(gap):
		}
	}
}

// Step steps every running bulk that no other replica is stepping once:
// it sends their next batches (through the Service's delivery: the
// replica holding each device's session publishes it; a device not
// listening gets it when it subscribes) and completes the finished ones.
func (b *Bulks) Step(ctx context.Context) {
	after := ""
	for ctx.Err() == nil {
		bulk, sent, found, err := b.store.StepBulk(ctx, after, b.svc.opts.Limits.MaxPending, b.svc.opts.Now)
		if err != nil {
			if ctx.Err() == nil {
				b.svc.log.Warn("cannot step a bulk command", "after", after, "err", err)
			}
			return
		}
		if !found {
			return
		}
		after = bulk.ID
		if bulk.State != BulkRunning {
			b.noteChanged(bulk.ID)
			b.svc.log.Info("bulk command finished", "bulk_id", bulk.ID, "state", bulk.State, "total", bulk.Total,
				"succeeded", bulk.Counts.Succeeded, "failed", bulk.Counts.Failed)
		}
		b.svc.m.created.Add(float64(len(sent)))
		b.deliverAll(ctx, sent)
	}
}

// deliverers is how many of a batch's commands are handed to sessions at
// once: each delivery records itself in the database, and one at a time
// would cap a bulk at a few hundred devices a second.
const deliverers = 8

func (b *Bulks) deliverAll(ctx context.Context, cs []Command) {
	next := make(chan Command)
	var wg sync.WaitGroup
	for range min(deliverers, len(cs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range next {
				b.svc.changed(c)
				b.svc.deliver(ctx, c)
			}
		}()
	}
	for _, c := range cs {
		next <- c
	}
	close(next)
	wg.Wait()
}

// publish reads the bulks that changed here and hands their progress to
// OnChange.
func (b *Bulks) publish(ctx context.Context) {
	b.mu.Lock()
	dirty := b.dirty
	b.dirty = map[string]struct{}{}
	b.mu.Unlock()
	for id := range dirty {
		bulk, err := b.store.GetBulk(ctx, id)
		if errors.Is(err, ErrNotFound) {
			continue // pruned
		}
		if err != nil {
			// The database is away: the next round publishes it. A bulk's
			// last change (its completion) has no next change to carry it.
			b.mu.Lock()
			b.dirty[id] = struct{}{}
			b.mu.Unlock()
			continue
		}
		b.onChange(bulk.Change(b.svc.opts.Now()))
	}
}

// Change is the bulk's progress as live views get it, read at.
func (bk Bulk) Change(at time.Time) BulkChange {
	return BulkChange{ID: bk.ID, Name: bk.Name, State: bk.State, Total: bk.Total, Counts: bk.Counts, At: at}
}
