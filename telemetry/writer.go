package telemetry

import (
	"context"
	"fmt"
	"hash/maphash"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// batchStore is the storage the writer needs (Store).
type batchStore interface {
	writeBatch(ctx context.Context, batch []Entry) error
	ensurePartitions(ctx context.Context, first, last time.Time) ([]string, error)
}

// WriterOptions tune the writer.
type WriterOptions struct {
	// QueueSize is how many messages may wait for the database; past it new
	// ones are dropped and counted. Default 100 000.
	QueueSize int
	// Writers is how many connections write at once, each for its own share
	// of the devices, so that they never wait on each other's rows. Default 2.
	Writers int
	// BatchSize caps the messages written in one transaction. Default 5000.
	BatchSize int
	// FlushInterval is the longest a message waits for its batch. Default
	// 100 ms.
	FlushInterval time.Duration
	// WriteTimeout bounds one batch write. Default 10 s.
	WriteTimeout time.Duration
	Logger       *slog.Logger
	Registerer   prometheus.Registerer
}

// logEvery is how often the writer may log drops at a full queue; the ones
// in between are counted in the next line.
const logEvery = time.Minute

// Writer drains the queue of parsed messages into the database in batches:
// one COPY of a row per message into telemetry_raw (Store.writeBatch), so
// that a message costs one row however many metrics it carries and however
// many devices send; the rollups are computed from those rows by RollupJob. The queue is split by device among
// WriterOptions.Writers shards, each with its own goroutine and connection:
// a device's rows are only ever written by its shard, so shards never lock
// each other's rows.
//
// Unlike connection events (fleet.Recorder), telemetry is not spooled to
// disk when the database fails. Points are samples of a continuous signal
// that the next message measures again, and the rollups count only what was
// stored, so a gap is visible and corrupts nothing; a spool would put the
// disk on the path of the fleet's busiest stream for data whose value fades
// in minutes. While the database is down each shard keeps its batch and
// retries it every second, messages wait in the queue (QueueSize), and past
// that the newest are dropped: counted in
// fleetd_telemetry_dropped_total{reason="queue_full"} and logged once a
// minute, never silently.
type Writer struct {
	s      batchStore
	opts   WriterOptions
	log    *slog.Logger
	seed   maphash.Seed
	shards []*shard

	stop      chan struct{}
	closeOnce sync.Once
	// ctx is cancelled when Close gives up waiting: the writes under way end.
	ctx    context.Context
	cancel context.CancelFunc

	fullSince atomic.Int64 // drops at a full queue not yet logged

	mWritten, mPoints, mErrors prometheus.Counter
	mDropped                   *prometheus.CounterVec
	mFull, mRefused, mShutdown prometheus.Counter
	mBatch                     prometheus.Histogram
	mQueued, mCapacity         prometheus.GaugeFunc
	mPartitions                prometheus.Counter
}

// shard is one writer goroutine and its part of the queue.
type shard struct {
	w    *Writer
	q    chan Entry
	done chan struct{}
	// logs says this shard logs the drops at a full queue (the first).
	logs bool

	// Used by the shard's goroutine only.
	degraded bool
	retryAt  time.Time
	logged   time.Time
}

// NewWriter starts the writer on s.
func NewWriter(s batchStore, opts WriterOptions) *Writer {
	orDefault(&opts.QueueSize, 100_000)
	orDefault(&opts.Writers, 2)
	orDefault(&opts.BatchSize, 5000)
	orDefault(&opts.FlushInterval, 100*time.Millisecond)
	orDefault(&opts.WriteTimeout, 10*time.Second)
	orDefault(&opts.Logger, slog.New(slog.DiscardHandler))
	w := &Writer{s: s, opts: opts, log: opts.Logger, seed: maphash.MakeSeed(), stop: make(chan struct{})}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	w.mWritten = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_telemetry_written_total", Help: "Telemetry messages committed to PostgreSQL."})
	w.mPoints = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_telemetry_points_written_total", Help: "Telemetry points (one metric of one message) committed to PostgreSQL."})
	w.mErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_telemetry_write_errors_total", Help: "Failed telemetry batch writes."})
	w.mDropped = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetd_telemetry_dropped_total",
		Help: "Telemetry messages lost after they were accepted, by reason: queue_full (the database was slow or down and the queue full), refused (PostgreSQL refused the message), shutdown (still queued when fleetd stopped). Telemetry is not spooled to disk."}, []string{"reason"})
	w.mFull, w.mRefused, w.mShutdown = w.mDropped.WithLabelValues("queue_full"), w.mDropped.WithLabelValues("refused"), w.mDropped.WithLabelValues("shutdown")
	w.mBatch = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "fleetd_telemetry_batch_seconds", Help: "Time to commit one telemetry batch.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)})
	w.mQueued = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_telemetry_queued", Help: "Telemetry messages waiting for the writer."}, func() float64 { return float64(w.queued()) })
	w.mCapacity = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_telemetry_queue_capacity", Help: "How many telemetry messages may wait for the writer (telemetry-queue)."}, func() float64 { return float64(opts.QueueSize) })
	w.mPartitions = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_telemetry_partitions_created_total", Help: "Daily partitions of telemetry_raw created by the writer because a message's day had none yet."})
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(w.mWritten, w.mPoints, w.mErrors, w.mDropped, w.mBatch, w.mQueued, w.mCapacity, w.mPartitions)
	}
	for i := range opts.Writers {
		sh := &shard{w: w, q: make(chan Entry, max(1, opts.QueueSize/opts.Writers)), done: make(chan struct{}), logs: i == 0}
		w.shards = append(w.shards, sh)
		go sh.run()
	}
	return w
}

func (w *Writer) queued() int {
	n := 0
	for _, sh := range w.shards {
		n += len(sh.q)
	}
	return n
}

// Enqueue queues a message on its device's shard without waiting. When the
// shard's queue is full it drops the message, counts it and returns false.
func (w *Writer) Enqueue(e Entry) bool {
	sh := w.shards[0]
	if len(w.shards) > 1 {
		sh = w.shards[maphash.String(w.seed, e.DeviceID)%uint64(len(w.shards))]
	}
	select {
	case sh.q <- e:
		return true
	default:
		w.mFull.Inc()
		w.fullSince.Add(1)
		return false
	}
}

// Close writes what is queued and stops the writer. When ctx ends first, the
// writes under way are abandoned and what is left is dropped, counted as
// shutdown; the error says how many.
func (w *Writer) Close(ctx context.Context) error {
	w.closeOnce.Do(func() { close(w.stop) })
	if w.finished(ctx) {
		return nil
	}
	w.cancel()
	for _, sh := range w.shards {
		<-sh.done
	}
	if n := w.queued(); n > 0 {
		w.mShutdown.Add(float64(n))
		return fmt.Errorf("%d telemetry messages still queued at shutdown: %w", n, ctx.Err())
	}
	return nil
}

// finished waits for every shard to end, and reports false if ctx ended first.
func (w *Writer) finished(ctx context.Context) bool {
	for _, sh := range w.shards {
		select {
		case <-sh.done:
		case <-ctx.Done():
			return false
		}
	}
	return true
}

func (sh *shard) run() {
	defer close(sh.done)
	w := sh.w
	t := time.NewTicker(w.opts.FlushInterval)
	defer t.Stop()
	batch := make([]Entry, 0, w.opts.BatchSize)
	for {
		in := sh.q
		if len(batch) == w.opts.BatchSize {
			in = nil // full: wait for the tick (a retry) rather than take more
		}
		select {
		case <-w.stop:
			sh.drain(batch)
			return
		case e := <-in:
			batch = append(batch, e)
			if len(batch) < w.opts.BatchSize {
				continue
			}
		case <-t.C:
			sh.logFull(time.Now())
		}
		if len(batch) == 0 || (sh.degraded && time.Now().Before(sh.retryAt)) {
			continue
		}
		batch = sh.fill(batch)
		if sh.store(batch, false) {
			batch = batch[:0]
		}
	}
}

// fill adds to batch what waits in the queue, up to BatchSize.
func (sh *shard) fill(batch []Entry) []Entry {
	for len(batch) < sh.w.opts.BatchSize {
		select {
		case e := <-sh.q:
			batch = append(batch, e)
		default:
			return batch
		}
	}
	return batch
}

// drain writes everything queued at shutdown, one attempt per batch: what
// the database cannot take then is dropped and counted.
func (sh *shard) drain(batch []Entry) {
	w := sh.w
	for {
		batch = sh.fill(batch)
		if len(batch) == 0 {
			break
		}
		if !sh.store(batch, false) {
			w.mShutdown.Add(float64(len(batch)))
			w.log.Error("telemetry dropped at shutdown: the database cannot take it", "messages", len(batch))
		}
		batch = batch[:0]
		if w.ctx.Err() != nil {
			break
		}
	}
	sh.logFull(time.Time{})
}

// store writes a batch and reports whether it is done with: written, or its
// refused messages dropped. It returns false when the database is
// unavailable; the batch is then retried as it is, which stores nothing twice.
// partitioned says the partitions of the batch's days were just created.
func (sh *shard) store(batch []Entry, partitioned bool) bool {
	w := sh.w
	err := w.write(batch)
	if err == nil {
		sh.recovered()
		return true
	}
	f := classify(err)
	if f == failNoPartition && !partitioned {
		if err = w.createPartitions(batch); err == nil {
			return sh.store(batch, true)
		}
		f = classify(err)
	}
	if f == failUnavailable {
		sh.unavailable(err, len(batch))
		return false
	}
	// PostgreSQL refused the content of some message (or found no partition
	// for it even after creating them): halve the batch until the refused
	// ones are alone, so that they cannot hold back the others.
	if len(batch) == 1 {
		w.mRefused.Inc()
		w.log.Error("database refused a telemetry message; dropped", "device_id", excerpt(batch[0].DeviceID), "err", err)
		return true
	}
	mid := len(batch) / 2
	return sh.store(batch[:mid], partitioned) && sh.store(batch[mid:], partitioned)
}

func (w *Writer) write(batch []Entry) error {
	ctx, cancel := context.WithTimeout(w.ctx, w.opts.WriteTimeout)
	defer cancel()
	start := time.Now()
	if err := w.s.writeBatch(ctx, batch); err != nil {
		w.mErrors.Inc()
		return err
	}
	w.mBatch.Observe(time.Since(start).Seconds())
	w.mWritten.Add(float64(len(batch)))
	points := 0
	for i := range batch {
		points += len(batch[i].Metrics)
	}
	w.mPoints.Add(float64(points))
	return nil
}

// createPartitions creates the partitions of the days a batch's points fall
// on.
func (w *Writer) createPartitions(batch []Entry) error {
	first, last := batch[0].At, batch[0].At
	for i := range batch {
		if at := batch[i].At; at.Before(first) {
			first = at
		} else if at.After(last) {
			last = at
		}
	}
	ctx, cancel := context.WithTimeout(w.ctx, w.opts.WriteTimeout)
	defer cancel()
	created, err := w.s.ensurePartitions(ctx, first, last)
	if err != nil {
		return err
	}
	w.mPartitions.Add(float64(len(created)))
	if len(created) > 0 {
		w.log.Warn("created telemetry partitions for points whose day had none (retention creates them ahead: is it running?)", "partitions", created)
	}
	return nil
}

// unavailable notes that the database cannot take the shard's writes:
// logged once per outage, retried a second later.
func (sh *shard) unavailable(err error, messages int) {
	if !sh.degraded {
		sh.w.log.Error("cannot write telemetry; retrying every second, and dropping new messages once the queue is full",
			"err", err, "messages", messages, "queued", sh.w.queued(), "queue_size", sh.w.opts.QueueSize)
	}
	sh.degraded = true
	sh.retryAt = time.Now().Add(time.Second)
}

func (sh *shard) recovered() {
	if sh.degraded {
		sh.degraded = false
		sh.w.log.Info("database answers again; writing telemetry", "queued", sh.w.queued())
	}
}

// logFull logs the messages dropped at a full queue, at most once per
// logEvery unless now is zero (shutdown); only the first shard logs.
func (sh *shard) logFull(now time.Time) {
	if !sh.logs || (!now.IsZero() && now.Sub(sh.logged) < logEvery) {
		return
	}
	n := sh.w.fullSince.Swap(0)
	if n == 0 {
		return
	}
	sh.logged = now
	sh.w.log.Error("telemetry dropped: the writer's queue is full (the database is slow or down)",
		"dropped_since_last_log", n, "queue_size", sh.w.opts.QueueSize, "database_unavailable", sh.degraded)
}
