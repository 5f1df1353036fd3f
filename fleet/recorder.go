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
	writeDeadLetter(ctx context.Context, d deadLetter) (added bool, err error)
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
	// BehindAfter is how old the oldest event not yet in the database may get
	// before Ready reports the recorder behind. Default 30 s.
	BehindAfter time.Duration
	Logger      *slog.Logger
	Registerer  prometheus.Registerer
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
//
// A write PostgreSQL refuses for its content (classifyWriteError) is split in
// halves until the refused events are alone; the rest is written and those go
// to event_dead_letters, so that one bad event, even one left in the spool by
// a previous run, never holds back the events of every other device.
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
	// The times of the oldest events not yet in the database, besides buf[0]:
	// the batch being written, and the first event of the spool file. Zero
	// when there is none.
	inflightAt time.Time
	spoolAt    time.Time

	// Used by the writer goroutine only.
	logDeadLetter, logDropped, logUnreadable logEvery

	mRecorded *prometheus.CounterVec
	mWritten  prometheus.Counter
	mSpooled  prometheus.Counter
	mErrors   prometheus.Counter
	mSpool    prometheus.Gauge
	mBuffered prometheus.GaugeFunc
	mBatch    prometheus.Histogram
	mDead     prometheus.Counter
	mDropped  prometheus.Counter
	mOldest   prometheus.GaugeFunc
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
	if opts.BehindAfter == 0 {
		opts.BehindAfter = 30 * time.Second
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
	r := &Recorder{w: w, opts: opts, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}),
		logDeadLetter: logEvery{every: deadLetterLogEvery}, logDropped: logEvery{every: deadLetterLogEvery},
		logUnreadable: logEvery{every: deadLetterLogEvery}}
	if err := r.openSpool(); err != nil {
		return nil, err
	}
	if r.spooled > 0 {
		opts.Logger.Warn("replaying events spooled by a previous run", "spool", opts.SpoolPath, "bytes", r.spooled,
			"oldest", r.spoolAt)
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
	r.mDead = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_events_dead_lettered_total", Help: "Connection events PostgreSQL refused for their content, kept in event_dead_letters instead of device_events."})
	r.mDropped = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_events_dropped_total", Help: "Connection events dropped: refused by device_events and by event_dead_letters, or unreadable in the spool."})
	r.mOldest = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_event_oldest_unwritten_seconds", Help: "Age of the oldest connection event not yet in PostgreSQL (in memory or spooled); 0 when none waits."}, func() float64 {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.oldestAgeLocked(time.Now()).Seconds()
	})
	r.mSpool.Set(float64(r.spooled))
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(r.mRecorded, r.mWritten, r.mSpooled, r.mErrors, r.mSpool, r.mBuffered, r.mBatch,
			r.mDead, r.mDropped, r.mOldest)
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

// Ready reports whether connection events reach the database in time. While
// the database is down or refuses writes, events wait in memory and in the
// spool without anyone noticing from the outside; once the oldest of them is
// older than RecorderOptions.BehindAfter, Ready returns an error saying how
// far behind the recorder is, so that /readyz stops claiming all is well.
func (r *Recorder) Ready(ctx context.Context) error {
	r.mu.Lock()
	age := r.oldestAgeLocked(time.Now())
	buffered, spooled := len(r.buf), r.spooled
	r.mu.Unlock()
	if age <= r.opts.BehindAfter {
		return nil
	}
	unit := time.Second
	if age < 10*time.Second {
		unit = 10 * time.Millisecond // a short BehindAfter (tests) still reads sensibly
	}
	return fmt.Errorf("event recorder is behind: oldest unwritten event is %s old (%d events buffered, %d bytes spooled)",
		age.Round(unit), buffered, spooled)
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

func (r *Recorder) run() {
	defer close(r.done)
	t := time.NewTicker(r.opts.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			r.flush()
			r.logHeldBack()
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
		if n > 0 {
			r.inflightAt = batch[0].At
		}
		r.mu.Unlock()
		if n == 0 {
			return
		}
		done, err := r.store(batch)
		r.mu.Lock()
		r.inflightAt = time.Time{}
		if err != nil {
			// What was stored stays stored; the rest waits in the spool.
			rest := append(batch[done:], r.buf...)
			r.buf = nil
			if serr := r.appendSpoolLocked(rest); serr != nil {
				r.buf = rest
				r.opts.Logger.Error("event spool write failed; keeping events in memory", "err", serr)
			}
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
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
		r.mDropped.Inc()
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
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.trimSpoolLocked(limit); err != nil {
		r.opts.Logger.Error("trim event spool", "err", err)
		return
	}
	r.degraded = false
	r.opts.Logger.Info("database answers again; replayed spooled connection events", "events", total)
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
	r.mDropped.Inc()
	if held, ok := r.logUnreadable.allow(time.Now()); ok {
		r.opts.Logger.Error("skipping unreadable line in event spool", "err", cleanText(err.Error(), logExcerpt),
			"line", excerpt(string(l.data)), "line_bytes", l.size, "more_since_last_log", held)
	}
	return e, false
}

// openSpool takes over the spool a previous run left: its size, the time of
// its first event, and a final newline, without which the first event
// appended now would merge with a line cut by a crash and be lost with it.
func (r *Recorder) openSpool() error {
	f, err := os.OpenFile(r.opts.SpoolPath, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open event spool: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("open event spool: %w", err)
	}
	r.spooled = st.Size()
	if r.spooled == 0 {
		return nil
	}
	last := make([]byte, 1)
	if _, err := f.ReadAt(last, r.spooled-1); err != nil {
		return fmt.Errorf("read event spool: %w", err)
	}
	if last[0] != '\n' {
		if _, err := f.WriteAt([]byte{'\n'}, r.spooled); err != nil {
			return fmt.Errorf("repair event spool: %w", err)
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("repair event spool: %w", err)
		}
		r.spooled++
	}
	if r.spoolAt = firstSpooledAt(f); r.spoolAt.IsZero() {
		r.spoolAt = time.Now() // unknown, but at least as old as this start
	}
	return nil
}

// firstSpooledAt is the time of the first readable event of a spool file, or
// zero when it has none.
func firstSpooledAt(f io.ReaderAt) time.Time {
	lines := newSpoolLines(io.NewSectionReader(f, 0, 1<<62))
	for {
		l, err := lines.next()
		if err != nil {
			return time.Time{}
		}
		var e Event
		if !l.tooLong && json.Unmarshal(l.data, &e) == nil && !e.At.IsZero() {
			return e.At
		}
	}
}

// maxSpoolLine bounds the memory one spooled event may take during a replay;
// a longer line is skipped rather than stopping the replay.
const maxSpoolLine = 16 << 20

var errTooLong = fmt.Errorf("line longer than %d bytes", maxSpoolLine)

// spoolLine is one line of the spool, without its newline.
type spoolLine struct {
	data    []byte // the line, or only its start when tooLong
	size    int    // the whole line's length
	tooLong bool
}

// spoolLines reads the spool line by line, whatever the lines' lengths.
type spoolLines struct {
	br  *bufio.Reader
	buf []byte
}

func newSpoolLines(r io.Reader) *spoolLines {
	return &spoolLines{br: bufio.NewReaderSize(r, 64*1024)}
}

// next returns the next line, valid until the following call, or io.EOF.
func (s *spoolLines) next() (spoolLine, error) {
	l := spoolLine{}
	s.buf = s.buf[:0]
	for {
		chunk, err := s.br.ReadSlice('\n')
		l.size += len(chunk)
		if !l.tooLong && len(s.buf)+len(chunk) <= maxSpoolLine {
			s.buf = append(s.buf, chunk...)
		} else {
			l.tooLong = true
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil && !(errors.Is(err, io.EOF) && l.size > 0) {
			return l, err
		}
		if n := len(chunk); n > 0 && chunk[n-1] == '\n' {
			l.size--
			if !l.tooLong {
				s.buf = s.buf[:len(s.buf)-1]
			}
		}
		l.data = s.buf
		return l, nil
	}
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
	if r.spooled == 0 || r.spoolAt.IsZero() {
		r.spoolAt = oldestAt(events)
	}
	r.spooled = st.Size()
	r.mSpool.Set(float64(r.spooled))
	r.mSpooled.Add(float64(len(events)))
	return nil
}

// oldestAt is the earliest time of events, ignoring zero times.
func oldestAt(events []Event) time.Time {
	var t time.Time
	for i := range events {
		if at := events[i].At; !at.IsZero() && (t.IsZero() || at.Before(t)) {
			t = at
		}
	}
	return t
}

// trimSpoolLocked drops the first n bytes of the spool (they are stored now).
func (r *Recorder) trimSpoolLocked(n int64) error {
	if r.spooled == n {
		if err := os.Remove(r.opts.SpoolPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		r.spooled = 0
		r.spoolAt = time.Time{}
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
	dst, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	written, err := io.Copy(dst, src)
	if err == nil {
		err = dst.Sync()
	}
	if err != nil {
		dst.Close()
		return err
	}
	if err := os.Rename(tmp, r.opts.SpoolPath); err != nil {
		dst.Close()
		return err
	}
	r.spooled = written
	r.spoolAt = firstSpooledAt(dst)
	dst.Close()
	r.mSpool.Set(float64(written))
	return nil
}
