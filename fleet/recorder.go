package fleet

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// eventWriter is the storage the recorder needs.
type eventWriter interface {
	writeEvents(ctx context.Context, events []Event) error
}

// RecorderOptions tune the event pipeline.
type RecorderOptions struct {
	// SpoolPath is the file events go to while the database cannot take them.
	SpoolPath string
	// FlushInterval is the longest an event waits in memory. Default 50 ms.
	FlushInterval time.Duration
	// BatchSize caps the events written in one transaction. Default 5000.
	BatchSize int
	// MaxBuffered is how many events may wait in memory before they are
	// spilled to the spool file. Default 200 000.
	MaxBuffered int
	// WriteTimeout bounds one database write. Default 10 s.
	WriteTimeout time.Duration
	Logger       *slog.Logger
	Registerer   prometheus.Registerer
	// Observe, when set, sees every event as it is recorded (live views).
	// It runs on the broker's hot path: it must not block.
	Observe func(Event)
}

// Recorder takes connection events from the broker's hooks without ever
// blocking them on the database, and writes them in batches. When the
// database fails, events go to an append-only spool file (fsynced), which is
// replayed in order once the database answers again: nothing is lost, and the
// events' ids make the replay idempotent. Order is kept: spooled events are
// always older than buffered ones.
type Recorder struct {
	w    eventWriter
	opts RecorderOptions

	mu       sync.Mutex
	buf      []Event
	spooled  int64 // bytes in the spool file
	closed   bool
	wake     chan struct{}
	stop     chan struct{}
	done     chan struct{}
	degraded bool      // the last write failed; logged once per outage
	retryAt  time.Time // while degraded, the next replay attempt

	mRecorded *prometheus.CounterVec
	mWritten  prometheus.Counter
	mSpooled  prometheus.Counter
	mErrors   prometheus.Counter
	mSpool    prometheus.Gauge
	mBuffered prometheus.GaugeFunc
	mBatch    prometheus.Histogram
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
	if opts.WriteTimeout == 0 {
		opts.WriteTimeout = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.SpoolPath == "" {
		return nil, errors.New("recorder: SpoolPath is required")
	}
	if err := os.MkdirAll(filepath.Dir(opts.SpoolPath), 0o700); err != nil {
		return nil, fmt.Errorf("create spool dir: %w", err)
	}
	r := &Recorder{w: w, opts: opts, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	if st, err := os.Stat(opts.SpoolPath); err == nil {
		r.spooled = st.Size()
		if r.spooled > 0 {
			opts.Logger.Warn("replaying events spooled by a previous run", "spool", opts.SpoolPath, "bytes", r.spooled)
		}
	}
	r.mRecorded = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetd_events_recorded_total", Help: "Connection events recorded, by kind."}, []string{"kind"})
	r.mWritten = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_events_written_total", Help: "Connection events committed to PostgreSQL."})
	r.mSpooled = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_events_spooled_total", Help: "Connection events written to the spool file because PostgreSQL could not take them."})
	r.mErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_event_write_errors_total", Help: "Failed event batch writes."})
	r.mSpool = prometheus.NewGauge(prometheus.GaugeOpts{Name: "fleetd_event_spool_bytes", Help: "Bytes waiting in the event spool file."})
	r.mBuffered = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_event_buffered", Help: "Events waiting in memory for the writer."}, func() float64 {
		r.mu.Lock()
		defer r.mu.Unlock()
		return float64(len(r.buf))
	})
	r.mBatch = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "fleetd_event_batch_seconds", Help: "Time to commit one event batch.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)})
	r.mSpool.Set(float64(r.spooled))
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(r.mRecorded, r.mWritten, r.mSpooled, r.mErrors, r.mSpool, r.mBuffered, r.mBatch)
	}
	go r.run()
	return r, nil
}

// Record queues an event. It never waits for the database; when too many
// events are waiting in memory it spills them to the spool file instead of
// dropping them.
func (r *Recorder) Record(e Event) {
	r.mRecorded.WithLabelValues(string(e.Kind)).Inc()
	if r.opts.Observe != nil {
		r.opts.Observe(e)
	}
	r.mu.Lock()
	r.buf = append(r.buf, e)
	n := len(r.buf)
	if n >= r.opts.MaxBuffered {
		buf := r.buf
		r.buf = nil
		if err := r.appendSpoolLocked(buf); err != nil {
			// The disk failed too: keep the events in memory rather than lose them.
			r.buf = append(buf, r.buf...)
			r.opts.Logger.Error("event spool write failed; keeping events in memory", "err", err, "buffered", len(r.buf))
		}
	}
	r.mu.Unlock()
	if n >= r.opts.BatchSize {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
}

// Close writes every pending event, to the database or, failing that, to the
// spool, and stops the writer.
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
		return nil
	case <-ctx.Done():
	}
	// The database is too slow to drain in time: the spool keeps the rest.
	r.mu.Lock()
	defer r.mu.Unlock()
	buf := r.buf
	r.buf = nil
	if err := r.appendSpoolLocked(buf); err != nil {
		return fmt.Errorf("spool %d pending events at shutdown: %w", len(buf), err)
	}
	return ctx.Err()
}

func (r *Recorder) run() {
	defer close(r.done)
	t := time.NewTicker(r.opts.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			r.flush()
			return
		case <-r.wake:
		case <-t.C:
		}
		r.flush()
	}
}

// flush moves what is waiting to the database. While the spool holds events,
// new ones join it first, so that order is kept, and the spool is replayed.
func (r *Recorder) flush() {
	r.mu.Lock()
	if r.spooled > 0 {
		buf := r.buf
		r.buf = nil
		if err := r.appendSpoolLocked(buf); err != nil {
			r.buf = append(buf, r.buf...)
			r.opts.Logger.Error("event spool write failed; keeping events in memory", "err", err)
		}
	}
	spooled := r.spooled
	r.mu.Unlock()

	if spooled > 0 {
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
		batch := r.buf[:n:n]
		r.buf = r.buf[n:]
		if len(r.buf) == 0 {
			r.buf = nil
		}
		r.mu.Unlock()
		if n == 0 {
			return
		}
		if err := r.write(batch); err != nil {
			r.mu.Lock()
			rest := r.buf
			r.buf = nil
			if serr := r.appendSpoolLocked(append(batch, rest...)); serr != nil {
				r.buf = append(append(batch, rest...), r.buf...)
				r.opts.Logger.Error("event spool write failed; keeping events in memory", "err", serr)
			}
			r.mu.Unlock()
			return
		}
	}
}

func (r *Recorder) write(batch []Event) error {
	ctx, cancel := context.WithTimeout(context.Background(), r.opts.WriteTimeout)
	defer cancel()
	start := time.Now()
	err := r.w.writeEvents(ctx, batch)
	if err != nil {
		r.mErrors.Inc()
		if !r.degraded {
			r.opts.Logger.Error("cannot write connection events; spooling them until the database answers",
				"err", err, "spool", r.opts.SpoolPath, "events", len(batch))
		}
		r.degraded = true
		r.retryAt = time.Now().Add(time.Second)
		return err
	}
	r.mBatch.Observe(time.Since(start).Seconds())
	r.mWritten.Add(float64(len(batch)))
	return nil
}

// replay writes the spool to the database in batches, in file order. Only
// the part of the file that existed when it started is replayed and removed;
// events spilled meanwhile stay for the next round.
func (r *Recorder) replay() {
	f, err := os.Open(r.opts.SpoolPath)
	if err != nil {
		r.opts.Logger.Error("open event spool", "err", err)
		return
	}
	defer f.Close()
	r.mu.Lock()
	limit := r.spooled
	r.mu.Unlock()
	sc := bufio.NewScanner(io.LimitReader(f, limit))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	batch := make([]Event, 0, r.opts.BatchSize)
	total := 0
	for {
		more := sc.Scan()
		if more {
			var e Event
			if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
				r.opts.Logger.Error("skipping unreadable line in event spool", "err", err, "line", sc.Text())
			} else {
				batch = append(batch, e)
			}
		}
		if len(batch) == r.opts.BatchSize || (!more && len(batch) > 0) {
			if err := r.write(batch); err != nil {
				return // retried on the next flush; replayed events are not stored twice
			}
			total += len(batch)
			batch = batch[:0]
		}
		if !more {
			break
		}
	}
	if err := sc.Err(); err != nil {
		r.opts.Logger.Error("read event spool", "err", err)
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.trimSpoolLocked(limit); err != nil {
		r.opts.Logger.Error("trim event spool", "err", err)
		return
	}
	r.degraded = false
	r.opts.Logger.Info("database answers again; replayed spooled connection events", "events", total)
}

// appendSpoolLocked appends events to the spool as JSON lines and fsyncs.
func (r *Recorder) appendSpoolLocked(events []Event) error {
	if len(events) == 0 {
		return nil
	}
	f, err := os.OpenFile(r.opts.SpoolPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 64*1024)
	enc := json.NewEncoder(w)
	for i := range events {
		if err := enc.Encode(&events[i]); err != nil {
			f.Close()
			return err
		}
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	st, err := f.Stat()
	f.Close()
	if err != nil {
		return err
	}
	r.spooled = st.Size()
	r.mSpool.Set(float64(r.spooled))
	r.mSpooled.Add(float64(len(events)))
	return nil
}

// trimSpoolLocked drops the first n bytes of the spool (they are stored now).
func (r *Recorder) trimSpoolLocked(n int64) error {
	if r.spooled == n {
		if err := os.Remove(r.opts.SpoolPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		r.spooled = 0
		r.mSpool.Set(0)
		return nil
	}
	src, err := os.Open(r.opts.SpoolPath)
	if err != nil {
		return err
	}
	defer src.Close()
	if _, err := src.Seek(n, io.SeekStart); err != nil {
		return err
	}
	tmp := r.opts.SpoolPath + ".tmp"
	dst, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	written, err := io.Copy(dst, src)
	if err == nil {
		err = dst.Sync()
	}
	dst.Close()
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, r.opts.SpoolPath); err != nil {
		return err
	}
	r.spooled = written
	r.mSpool.Set(float64(written))
	return nil
}
