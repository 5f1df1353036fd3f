package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// eventWriter is the storage the recorder needs.
type eventWriter interface {
	writeEvents(ctx context.Context, events []Event) error
	writeDeadLetter(ctx context.Context, d deadLetter) (added bool, err error)
}

// RecorderOptions tune the event pipeline.
type RecorderOptions struct {
	// SpoolPath is the file events go to while the database cannot take them.
	SpoolPath string
	// MaxSpoolBytes caps the spool file; see Recorder for what happens at the
	// cap. Default 1 GiB.
	MaxSpoolBytes int64
	// FlushInterval is the longest an event waits in memory. Default 50 ms.
	FlushInterval time.Duration
	// BatchSize caps the events written in one transaction. Default 5000.
	BatchSize int
	// MaxBuffered is how many events may wait in memory before they are
	// spilled to the spool file (more arrive while a spill is written: Record
	// does not wait for it), and, once the spool is at its cap, how many may
	// wait at all. Default 200 000.
	MaxBuffered int
	// WriteTimeout bounds one database write. Default 10 s.
	WriteTimeout time.Duration
	// BehindAfter is how old the oldest event not yet in the database may get
	// before Ready reports the recorder behind. Default 30 s.
	BehindAfter time.Duration
	Logger      *slog.Logger
	Registerer  prometheus.Registerer
	// Observe, when set, sees every event as it is recorded (live views).
	// It runs on the broker's hot path: it must not block.
	Observe func(Event)

	// spoolHook, when set (tests), runs inside the spool's file I/O with
	// fileMu held; see spoolFile.hook.
	spoolHook func(op string)
}

// defaultMaxSpoolBytes is RecorderOptions.MaxSpoolBytes when unset.
const defaultMaxSpoolBytes = 1 << 30

// spoolLogEvery is how often dropping events at the spool cap, or failing to
// write the spool, may be logged; the lines in between are counted in the
// next one.
const spoolLogEvery = time.Minute

// Recorder takes connection events from the broker's hooks without ever
// blocking them on the database or the disk, and writes them in batches.
// When the database fails, events go to an append-only spool file (fsynced),
// which is replayed in order once the database answers again: nothing is
// lost, and the events' ids make the replay idempotent. Order is kept:
// spooled events are always older than buffered ones.
//
// A write PostgreSQL refuses for its content (classifyWriteError) is split in
// halves until the refused events are alone; the rest is written and those go
// to event_dead_letters, so that one bad event, even one left in the spool by
// a previous run, never holds back the events of every other device.
//
// Record holds mu only to append to a slice. File I/O (appends and their
// fsync, the copy that trims the spool after a replay) runs under fileMu,
// which Record never takes, and never under mu; the lock order is fileMu,
// then mu. Three parties do file I/O: the writer goroutine, which besides the
// database writes spills a failed batch and trims the spool after a replay;
// the spool goroutine, which spills the buffer when MaxBuffered events wait,
// so that a spill never waits behind a database write of up to WriteTimeout;
// and Close, which spills what is left when its deadline passes.
//
// The spool is capped at MaxSpoolBytes, so that an outage cannot fill the
// disk. At the cap the spool takes nothing more, and recording into the
// database goes on as soon as it answers: the spool is replayed first, so that
// order holds, and the trim after the replay makes room again. Until then new
// events wait in memory, at most MaxBuffered of them, and past that the newest
// are dropped: counted in fleetd_events_dropped_total{reason="spool_full"},
// logged once a minute, shown by fleetd_event_spool_full and by Ready, never
// silently. Dropping the newest rather than the oldest keeps what is stored
// an unbroken record of how the incident began, which a flood of later events
// (a reconnect storm, an attacker's refused connects) cannot push out, and it
// costs Record one comparison. Presence heals from the gap: a device's next
// connect applies by its session epoch whatever was lost before it.
type Recorder struct {
	w    eventWriter
	opts RecorderOptions

	wake          chan struct{} // Record → writer: a batch is ready
	spill         chan struct{} // Record → spool goroutine: MaxBuffered events wait
	stop, done    chan struct{}
	spoolLoopDone chan struct{}

	// fileMu serialises the spool's file I/O. Guarded by it: the file itself,
	// and what only file I/O uses.
	fileMu       sync.Mutex
	spool        *spoolFile
	spillRetryAt time.Time // after a failed spool write, the next attempt
	logSpoolErr  logEvery

	mu  sync.Mutex
	buf []Event
	// inflight is the batch the writer is writing from buf, which it does only
	// while the spool is empty. A spill meanwhile spools a copy of it ahead of
	// buf, so that the spool keeps the order whatever the write's outcome, and
	// sets inflightKept: the writer then leaves the batch's fate to the spool.
	inflight     []Event
	inflightKept bool
	spooled      int64 // bytes in the spool file, as of its last change
	// spilling: a spill has taken events from buf and not yet put them in
	// the spool (or back). The writer treats it as a spool that holds events.
	spilling bool
	// full: a spill found the spool at its cap; cleared by the trim after a
	// replay. While full, nothing is spilled and Record drops events past
	// MaxBuffered.
	full         bool
	fullDropped  int64 // events dropped since the spool last filled
	unloggedFull int64 // events dropped at the cap, not yet logged
	closed       bool
	// lostAtStop says how many events the writer could not keep at
	// shutdown; written before done is closed.
	lostAtStop error
	// The times of the oldest events not yet in the database, besides buf[0]:
	// the batch being written, and the first event of the spool file. Zero
	// when there is none.
	inflightAt time.Time
	spoolAt    time.Time

	// Used by the writer goroutine only.
	degraded    bool      // the last write failed; logged once per outage
	retryAt     time.Time // while degraded, the next replay attempt
	lastFullLog time.Time // the last line about events dropped at the cap

	logDeadLetter, logDropped, logUnreadable logEvery

	mRecorded       *prometheus.CounterVec
	mWritten        prometheus.Counter
	mSpooled        prometheus.Counter
	mErrors         prometheus.Counter
	mSpool          prometheus.Gauge
	mSpoolMax       prometheus.Gauge
	mFull           prometheus.GaugeFunc
	mBuffered       prometheus.GaugeFunc
	mBatch          prometheus.Histogram
	mDead           prometheus.Counter
	mDropped        *prometheus.CounterVec
	mDropRefused    prometheus.Counter
	mDropUnreadable prometheus.Counter
	mDropFull       prometheus.Counter
	mDropSpoolErr   prometheus.Counter
	mOldest         prometheus.GaugeFunc
}

// NewRecorder starts the writer. Events left in the spool by a previous run
// are replayed before new ones.
func NewRecorder(w eventWriter, opts RecorderOptions) (*Recorder, error) {
	if opts.FlushInterval == 0 {
		opts.FlushInterval = 50 * time.Millisecond
	}
	if opts.BatchSize == 0 {
		opts.BatchSize = 5000
	}
	if opts.MaxBuffered == 0 {
		opts.MaxBuffered = 200_000
	}
	if opts.MaxSpoolBytes == 0 {
		opts.MaxSpoolBytes = defaultMaxSpoolBytes
	}
	if opts.WriteTimeout == 0 {
		opts.WriteTimeout = 10 * time.Second
	}
	if opts.BehindAfter == 0 {
		opts.BehindAfter = 30 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.SpoolPath == "" {
		return nil, errors.New("recorder: SpoolPath is required")
	}
	if opts.MaxSpoolBytes < 0 {
		return nil, fmt.Errorf("recorder: MaxSpoolBytes %d is negative", opts.MaxSpoolBytes)
	}
	if err := os.MkdirAll(filepath.Dir(opts.SpoolPath), 0o700); err != nil {
		return nil, fmt.Errorf("create spool dir: %w", err)
	}
	r := &Recorder{w: w, opts: opts, wake: make(chan struct{}, 1), spill: make(chan struct{}, 1),
		stop: make(chan struct{}), done: make(chan struct{}), spoolLoopDone: make(chan struct{}),
		spool:         &spoolFile{path: opts.SpoolPath, max: opts.MaxSpoolBytes, hook: opts.spoolHook},
		logSpoolErr:   logEvery{every: spoolLogEvery},
		logDeadLetter: logEvery{every: deadLetterLogEvery}, logDropped: logEvery{every: deadLetterLogEvery},
		logUnreadable: logEvery{every: deadLetterLogEvery}}
	if err := r.spool.open(); err != nil {
		return nil, err
	}
	r.spooled, r.spoolAt = r.spool.size, r.spool.at
	r.full = r.spooled >= opts.MaxSpoolBytes
	if r.spooled > 0 {
		opts.Logger.Warn("replaying events spooled by a previous run", "spool", opts.SpoolPath, "bytes", r.spooled,
			"oldest", r.spoolAt, "max_spool_bytes", opts.MaxSpoolBytes)
	}
	r.mRecorded = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetd_events_recorded_total", Help: "Connection events recorded, by kind."}, []string{"kind"})
	r.mWritten = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_events_written_total", Help: "Connection events committed to PostgreSQL."})
	r.mSpooled = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_events_spooled_total", Help: "Connection events written to the spool file because PostgreSQL could not take them."})
	r.mErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_event_write_errors_total", Help: "Failed event batch writes."})
	r.mSpool = prometheus.NewGauge(prometheus.GaugeOpts{Name: "fleetd_event_spool_bytes", Help: "Bytes waiting in the event spool file."})
	r.mSpoolMax = prometheus.NewGauge(prometheus.GaugeOpts{Name: "fleetd_event_spool_max_bytes", Help: "Cap on the event spool file, in bytes."})
	r.mFull = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_event_spool_full", Help: "1 while the event spool is at its cap: events PostgreSQL cannot take wait in memory, then are dropped."}, func() float64 {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.full {
			return 1
		}
		return 0
	})
	r.mBuffered = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_event_buffered", Help: "Events waiting in memory for the writer."}, func() float64 {
		r.mu.Lock()
		defer r.mu.Unlock()
		return float64(len(r.buf))
	})
	r.mBatch = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "fleetd_event_batch_seconds", Help: "Time to commit one event batch.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)})
	r.mDead = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_events_dead_lettered_total", Help: "Connection events PostgreSQL refused for their content, kept in event_dead_letters instead of device_events."})
	r.mDropped = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetd_events_dropped_total", Help: "Connection events lost, by reason: refused (by device_events and by event_dead_letters), unreadable (a line of the spool), spool_full (PostgreSQL could not take them and the spool was at its cap), spool_error (the spool could not be written at shutdown)."}, []string{"reason"})
	r.mDropRefused = r.mDropped.WithLabelValues("refused")
	r.mDropUnreadable = r.mDropped.WithLabelValues("unreadable")
	r.mDropFull = r.mDropped.WithLabelValues("spool_full")
	r.mDropSpoolErr = r.mDropped.WithLabelValues("spool_error")
	r.mOldest = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_event_oldest_unwritten_seconds", Help: "Age of the oldest connection event not yet in PostgreSQL (in memory or spooled); 0 when none waits."}, func() float64 {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.oldestAgeLocked(time.Now()).Seconds()
	})
	r.mSpool.Set(float64(r.spooled))
	r.mSpoolMax.Set(float64(opts.MaxSpoolBytes))
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(r.mRecorded, r.mWritten, r.mSpooled, r.mErrors, r.mSpool, r.mSpoolMax, r.mFull,
			r.mBuffered, r.mBatch, r.mDead, r.mDropped, r.mOldest)
	}
	go r.spoolLoop()
	go r.run()
	return r, nil
}

// Record queues an event. It never waits for the database or the disk: when
// MaxBuffered events wait in memory it hands them to the spool goroutine. At
// the spool's cap, an event that would make more than MaxBuffered wait is
// dropped and counted (see Recorder).
func (r *Recorder) Record(e Event) {
	r.mRecorded.WithLabelValues(string(e.Kind)).Inc()
	if r.opts.Observe != nil {
		r.opts.Observe(e)
	}
	r.mu.Lock()
	if r.full && len(r.buf) >= r.opts.MaxBuffered {
		r.fullDropped++
		r.unloggedFull++
		r.mu.Unlock()
		r.mDropFull.Inc()
		return
	}
	r.buf = append(r.buf, e)
	n := len(r.buf)
	spill := n >= r.opts.MaxBuffered && !r.full
	r.mu.Unlock()
	if spill {
		select {
		case r.spill <- struct{}{}:
		default:
		}
	}
	if n >= r.opts.BatchSize {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
}

// Close writes every pending event, to the database or, failing that, to the
// spool, and stops the writer. When ctx ends first, what waits in memory and
// the batch being written are spooled, and the error is ctx's. When the spool
// could not keep some events (at its cap, or failing), the error says how
// many were lost; they are counted in fleetd_events_dropped_total too.
func (r *Recorder) Close(ctx context.Context) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	close(r.stop)
	select {
	case <-r.done:
		return r.lostAtStop
	case <-ctx.Done():
	}
	// The database is too slow to drain in time: the spool keeps the rest.
	if n, err := r.dropLeftovers(r.spillBuffer(true)); n > 0 {
		return fmt.Errorf("spool %d pending events at shutdown: %w", n, err)
	}
	return ctx.Err()
}

// dropLeftovers counts and logs the events still in memory at shutdown, after
// a spill that could not take them (spillErr says why), and forgets them.
func (r *Recorder) dropLeftovers(spillErr error) (int, error) {
	r.mu.Lock()
	n := len(r.buf)
	r.buf = nil
	r.mu.Unlock()
	if n == 0 {
		return 0, nil
	}
	if spillErr == nil {
		spillErr = errors.New("recorded during shutdown, after the last spill")
	}
	reason, m := "spool_error", r.mDropSpoolErr
	if errors.Is(spillErr, errSpoolFull) {
		reason, m = "spool_full", r.mDropFull
	}
	m.Add(float64(n))
	r.opts.Logger.Error("connection events lost at shutdown: the database could not take them and the spool could not keep them",
		"events", n, "reason", reason, "err", spillErr, "spool", r.opts.SpoolPath, "max_spool_bytes", r.opts.MaxSpoolBytes)
	return n, spillErr
}

// Ready reports whether connection events reach the database in time. While
// the database is down or refuses writes, events wait in memory and in the
// spool without anyone noticing from the outside; once the oldest of them is
// older than RecorderOptions.BehindAfter, Ready returns an error saying how
// far behind the recorder is, so that /readyz stops claiming all is well.
// While the spool is at its cap, Ready returns an error naming the cap: events
// the database cannot take are then dropped past MaxBuffered.
func (r *Recorder) Ready(ctx context.Context) error {
	r.mu.Lock()
	age := r.oldestAgeLocked(time.Now())
	buffered, spooled, full, dropped := len(r.buf), r.spooled, r.full, r.fullDropped
	r.mu.Unlock()
	var errs []error
	if full {
		errs = append(errs, fmt.Errorf("event spool is at its cap of %d bytes (%d bytes spooled): events the database cannot take wait in memory (%d of at most %d), then are dropped (%d dropped since it filled)",
			r.opts.MaxSpoolBytes, spooled, buffered, r.opts.MaxBuffered, dropped))
	}
	if age > r.opts.BehindAfter {
		unit := time.Second
		if age < 10*time.Second {
			unit = 10 * time.Millisecond // a short BehindAfter (tests) still reads sensibly
		}
		errs = append(errs, fmt.Errorf("event recorder is behind: oldest unwritten event is %s old (%d events buffered, %d bytes spooled)",
			age.Round(unit), buffered, spooled))
	}
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return errs[0]
	}
	return fmt.Errorf("%w; %w", errs[0], errs[1]) // one line in /readyz
}

// oldestAgeLocked is the age of the oldest event not yet in the database, or 0
// when none waits.
func (r *Recorder) oldestAgeLocked(now time.Time) time.Duration {
	var oldest time.Time
	for _, at := range [...]time.Time{r.spoolAt, r.inflightAt, r.bufAtLocked()} {
		if !at.IsZero() && (oldest.IsZero() || at.Before(oldest)) {
			oldest = at
		}
	}
	if oldest.IsZero() {
		return 0
	}
	return max(now.Sub(oldest), 0)
}

func (r *Recorder) bufAtLocked() time.Time {
	if len(r.buf) == 0 {
		return time.Time{}
	}
	return r.buf[0].At
}

// spoolLoop spills the buffer when Record finds MaxBuffered events waiting.
func (r *Recorder) spoolLoop() {
	defer close(r.spoolLoopDone)
	for {
		select {
		case <-r.stop:
			return
		case <-r.spill:
		}
		r.mu.Lock()
		n := len(r.buf)
		r.mu.Unlock()
		if n >= r.opts.MaxBuffered { // the writer may have taken them meanwhile
			r.spillBuffer(false)
		}
	}
}

func (r *Recorder) run() {
	defer close(r.done)
	t := time.NewTicker(r.opts.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			<-r.spoolLoopDone // it may be spilling events it took from buf
			r.flush()
			if n, err := r.dropLeftovers(r.spillBuffer(true)); n > 0 {
				r.lostAtStop = fmt.Errorf("spool %d pending events at shutdown: %w", n, err)
			}
			r.logSpoolFull(time.Now(), true)
			r.logHeldBack()
			return
		case <-r.wake:
		case <-t.C:
		}
		r.flush()
		r.logSpoolFull(time.Now(), false)
	}
}

// spillBuffer moves the events waiting in memory to the spool, behind a copy
// of the batch being written if there is one, so that the spool keeps the
// events' order whatever that write's outcome (a batch written twice is
// stored once). What does not fit under the cap goes back to the front of
// buf, of which at most MaxBuffered events are kept: the newest beyond are
// dropped. After a failed write the events stay in memory and the next
// attempt waits a second, unless force (shutdown). It returns why events were
// left in memory, if any were: errSpoolFull or the write's error; nil too
// when it did not try, waiting after a failure.
func (r *Recorder) spillBuffer(force bool) error {
	r.fileMu.Lock()
	defer r.fileMu.Unlock()
	if !force && time.Now().Before(r.spillRetryAt) {
		return nil
	}
	r.mu.Lock()
	if r.full {
		r.mu.Unlock()
		return errSpoolFull
	}
	events := r.buf
	r.buf = nil
	if r.inflight != nil && !r.inflightKept {
		events = slices.Concat(r.inflight, events)
		r.inflightKept = true
	}
	r.spilling = len(events) > 0
	r.mu.Unlock()
	if len(events) == 0 {
		return nil
	}

	n, err := r.spool.append(events)

	r.mu.Lock()
	r.spilling = false
	r.spooled, r.spoolAt = r.spool.size, r.spool.at
	if rest := events[n:]; len(rest) > 0 {
		r.buf = slices.Concat(rest, r.buf)
	}
	filled := errors.Is(err, errSpoolFull)
	dropped := 0
	if filled {
		r.full, r.fullDropped = true, 0
		if extra := len(r.buf) - r.opts.MaxBuffered; extra > 0 {
			clear(r.buf[r.opts.MaxBuffered:])
			r.buf = r.buf[:r.opts.MaxBuffered]
			dropped = extra
			r.fullDropped += int64(extra)
			r.unloggedFull += int64(extra)
		}
	}
	buffered, spooled := len(r.buf), r.spooled
	r.mu.Unlock()

	r.mSpool.Set(float64(spooled))
	r.mSpooled.Add(float64(n))
	switch {
	case filled:
		r.mDropFull.Add(float64(dropped))
		r.opts.Logger.Error("event spool reached its cap: events the database cannot take now wait in memory, and past max_buffered are dropped",
			"spool", r.opts.SpoolPath, "spool_bytes", spooled, "max_spool_bytes", r.opts.MaxSpoolBytes,
			"buffered", buffered, "max_buffered", r.opts.MaxBuffered)
	case err != nil:
		r.spillRetryAt = time.Now().Add(time.Second)
		if held, ok := r.logSpoolErr.allow(time.Now()); ok {
			r.opts.Logger.Error("event spool write failed; keeping events in memory", "err", err, "spool", r.opts.SpoolPath,
				"buffered", buffered, "more_since_last_log", held)
		}
	}
	return err
}

// logSpoolFull logs the events dropped at the spool's cap, at most once per
// spoolLogEvery unless final.
func (r *Recorder) logSpoolFull(now time.Time, final bool) {
	if !final && !r.lastFullLog.IsZero() && now.Sub(r.lastFullLog) < spoolLogEvery {
		return
	}
	r.mu.Lock()
	n := r.unloggedFull
	r.unloggedFull = 0
	buffered, spooled, full := len(r.buf), r.spooled, r.full
	r.mu.Unlock()
	if n == 0 {
		return
	}
	r.lastFullLog = now
	r.opts.Logger.Error("connection events dropped: the database cannot take them and the event spool is at its cap",
		"dropped_since_last_log", n, "spool", r.opts.SpoolPath, "spool_bytes", spooled, "max_spool_bytes", r.opts.MaxSpoolBytes,
		"buffered", buffered, "spool_full", full)
}

// flush moves what is waiting to the database. While the spool holds events,
// new ones join it first, so that order is kept, and the spool is replayed.
func (r *Recorder) flush() {
	r.mu.Lock()
	spooled := r.spooled > 0 || r.spilling
	r.mu.Unlock()
	if spooled {
		r.spillBuffer(false) // after the spill under way, if any
		// While the database is down, try once a second, not on every tick.
		if r.degraded && time.Now().Before(r.retryAt) {
			return
		}
		r.replay()
		return
	}
	for {
		r.mu.Lock()
		n := min(len(r.buf), r.opts.BatchSize)
		if r.spooled > 0 || r.spilling || n == 0 {
			// Done, or a spill took the buffer meanwhile: then the spool goes
			// first, on the next flush.
			r.mu.Unlock()
			return
		}
		batch := r.buf[:n:n]
		r.buf = r.buf[n:]
		if len(r.buf) == 0 {
			r.buf = nil
		}
		r.inflight, r.inflightKept, r.inflightAt = batch, false, batch[0].At
		r.mu.Unlock()
		done, err := r.store(batch)
		r.mu.Lock()
		if err != nil && !r.inflightKept {
			// What was stored stays stored; the rest waits in the spool,
			// ahead of the newer events.
			r.buf = slices.Concat(batch[done:], r.buf)
		}
		r.inflight, r.inflightKept, r.inflightAt = nil, false, time.Time{}
		r.mu.Unlock()
		if err != nil {
			r.spillBuffer(false)
			return
		}
	}
}

// store writes a batch in order and returns how many of its leading events are
// done with: written, dead-lettered or dropped. When PostgreSQL refuses the
// batch for its content, the batch is bisected until each refused event is
// alone, and that event goes to the dead letters; O(k log n) writes for k bad
// events among n. The error is returned only when the database is unavailable;
// batch[done:] then still has to be written.
func (r *Recorder) store(batch []Event) (done int, err error) {
	err = r.write(batch)
	if err == nil {
		return len(batch), nil
	}
	if classifyWriteError(err) == failUnavailable {
		r.unavailable(err, len(batch))
		return 0, err
	}
	if len(batch) == 1 {
		if err := r.deadLetter(&batch[0], err); err != nil {
			return 0, err
		}
		return 1, nil
	}
	mid := len(batch) / 2
	done, err = r.store(batch[:mid])
	if err != nil {
		return done, err
	}
	done, err = r.store(batch[mid:])
	return mid + done, err
}

func (r *Recorder) write(batch []Event) error {
	ctx, cancel := context.WithTimeout(context.Background(), r.opts.WriteTimeout)
	defer cancel()
	start := time.Now()
	if err := r.w.writeEvents(ctx, batch); err != nil {
		r.mErrors.Inc()
		return err
	}
	r.mBatch.Observe(time.Since(start).Seconds())
	r.mWritten.Add(float64(len(batch)))
	return nil
}

// unavailable notes that the database cannot take writes: logged once per
// outage, retried a second later.
func (r *Recorder) unavailable(err error, events int) {
	if !r.degraded {
		r.opts.Logger.Error("cannot write connection events; spooling them until the database answers",
			"err", err, "spool", r.opts.SpoolPath, "events", events)
	}
	r.degraded = true
	r.retryAt = time.Now().Add(time.Second)
}

// deadLetter keeps an event PostgreSQL refused in event_dead_letters. When
// that insert is refused too, the event is dropped: nothing else could store
// it. The error is returned only when the database is unavailable, and then
// the event has to be retried.
func (r *Recorder) deadLetter(e *Event, cause error) error {
	d := newDeadLetter(e, cause)
	ctx, cancel := context.WithTimeout(context.Background(), r.opts.WriteTimeout)
	added, err := r.w.writeDeadLetter(ctx, d)
	cancel()
	switch {
	case err == nil && !added:
		return nil // kept by an earlier attempt (a spool replayed again)
	case err == nil:
		r.mDead.Inc()
		if held, ok := r.logDeadLetter.allow(time.Now()); ok {
			r.opts.Logger.Error("database refused a connection event; kept in event_dead_letters",
				"event", e.ID.String(), "device", excerpt(e.DeviceID), "device_bytes", len(e.DeviceID),
				"kind", excerpt(string(e.Kind)), "err", cleanText(cause.Error(), logExcerpt),
				"more_since_last_log", held)
		}
		return nil
	case classifyWriteError(err) == failUnavailable:
		r.unavailable(err, 1)
		return err
	default:
		r.mDropRefused.Inc()
		if held, ok := r.logDropped.allow(time.Now()); ok {
			r.opts.Logger.Error("database refused a connection event and its dead letter; event dropped",
				"event", e.ID.String(), "device", excerpt(e.DeviceID), "device_bytes", len(e.DeviceID),
				"err", cleanText(cause.Error(), logExcerpt), "dead_letter_err", cleanText(err.Error(), logExcerpt),
				"more_since_last_log", held)
		}
		return nil
	}
}

// logHeldBack reports, at shutdown, the events whose log lines were held back.
func (r *Recorder) logHeldBack() {
	for _, l := range []struct {
		msg string
		l   *logEvery
	}{
		{"connection events kept in event_dead_letters since the last log line", &r.logDeadLetter},
		{"connection events dropped since the last log line", &r.logDropped},
		{"unreadable spool lines skipped since the last log line", &r.logUnreadable},
	} {
		if l.l.held > 0 {
			r.opts.Logger.Error(l.msg, "count", l.l.held)
		}
	}
}

// replay writes the spool to the database in batches, in file order. Only
// the part of the file that existed when it started is replayed and removed;
// events spilled meanwhile stay for the next round. It reads without fileMu:
// appends only add to the end of the file, and only this goroutine trims it.
func (r *Recorder) replay() {
	r.mu.Lock()
	limit := r.spooled
	r.mu.Unlock()
	if limit == 0 {
		return // a spill failed and put its events back
	}
	f, err := os.Open(r.opts.SpoolPath)
	if err != nil {
		r.opts.Logger.Error("open event spool", "err", err)
		return
	}
	defer f.Close()
	lines := newSpoolLines(io.LimitReader(f, limit))
	batch := make([]Event, 0, r.opts.BatchSize)
	total := 0
	for {
		line, err := lines.next()
		more := err == nil
		if err != nil && err != io.EOF {
			r.opts.Logger.Error("read event spool", "err", err)
			return
		}
		if more {
			if e, ok := r.parseSpoolLine(line); ok {
				batch = append(batch, e)
			}
		}
		if len(batch) == r.opts.BatchSize || (!more && len(batch) > 0) {
			if _, err := r.store(batch); err != nil {
				return // retried on the next flush; replayed events are not stored twice
			}
			total += len(batch)
			batch = batch[:0]
		}
		if !more {
			break
		}
	}
	if err := r.trimSpool(limit); err != nil {
		r.opts.Logger.Error("trim event spool", "err", err)
		return
	}
	r.degraded = false
	r.opts.Logger.Info("database answers again; replayed spooled connection events", "events", total)
}

// trimSpool drops the first n bytes of the spool, which are stored now; the
// copy of the rest runs under fileMu, while Record goes on. It makes room
// under the cap again.
func (r *Recorder) trimSpool(n int64) error {
	r.fileMu.Lock()
	defer r.fileMu.Unlock()
	err := r.spool.trim(n)
	r.mu.Lock()
	r.spooled, r.spoolAt = r.spool.size, r.spool.at
	wasFull := r.full
	if err == nil {
		r.full = r.spooled >= r.opts.MaxSpoolBytes
	}
	cleared, dropped, spooled := wasFull && !r.full, r.fullDropped, r.spooled
	r.mu.Unlock()
	r.mSpool.Set(float64(spooled))
	if cleared {
		r.opts.Logger.Warn("event spool is below its cap again", "spool", r.opts.SpoolPath, "spool_bytes", spooled,
			"max_spool_bytes", r.opts.MaxSpoolBytes, "dropped_while_full", dropped)
	}
	return err
}

// parseSpoolLine decodes one spooled event. An unreadable line (a crash in
// the middle of an append, a line too long to hold) is skipped and counted:
// keeping it would stop the replay of everything after it.
func (r *Recorder) parseSpoolLine(l spoolLine) (Event, bool) {
	var e Event
	err := errTooLong
	if !l.tooLong {
		err = json.Unmarshal(l.data, &e)
	}
	if err == nil {
		return e, true
	}
	r.mDropUnreadable.Inc()
	if held, ok := r.logUnreadable.allow(time.Now()); ok {
		r.opts.Logger.Error("skipping unreadable line in event spool", "err", cleanText(err.Error(), logExcerpt),
			"line", excerpt(string(l.data)), "line_bytes", l.size, "more_since_last_log", held)
	}
	return e, false
}
