package fleet

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fleetd/fleetd/internal/pgserver"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/migrations"
)

// ownServer starts a private PostgreSQL this test may stop and restart.
func ownServer(t *testing.T) (*pgserver.Server, *pgxpool.Pool) {
	t.Helper()
	bin, err := pgserver.FindBinDir(os.Getenv("FLEETD_PG_BIN"))
	if err != nil {
		t.Skip(err)
	}
	dir, _ := os.MkdirTemp("", "fleet-recorder-")
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	srv := &pgserver.Server{Dir: filepath.Join(dir, "pg"), BinDir: bin, DieWithParent: true, Settings: map[string]string{"fsync": "off"}}
	ctx := context.Background()
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Stop(context.Background()) })
	pool, err := pgxpool.New(ctx, srv.ConnString())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if _, err := migrations.Up(ctx, pool, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	return srv, pool
}

func countEvents(t *testing.T, pool *pgxpool.Pool) (total, distinct int) {
	t.Helper()
	if err := pool.QueryRow(context.Background(), `SELECT count(*), count(DISTINCT id) FROM device_events`).Scan(&total, &distinct); err != nil {
		t.Fatal(err)
	}
	return
}

func waitUntil(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRecorderSurvivesOutage records events before, during and after a
// database outage and finds each one stored exactly once, with presence
// computed in the order the events happened.
func TestRecorderSurvivesOutage(t *testing.T) {
	srv, pool := ownServer(t)
	ctx := context.Background()
	store := NewStore(pool)
	for i := range 10 {
		if _, err := store.insertDevice(ctx, NewDevice{ID: fmt.Sprintf("d%d", i)}, make([]byte, 32)); err != nil {
			t.Fatal(err)
		}
	}
	spool := filepath.Join(t.TempDir(), "spool", "events.jsonl")
	rec, err := NewRecorder(store, RecorderOptions{SpoolPath: spool, FlushInterval: 10 * time.Millisecond, WriteTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	epoch := int64(0)
	at := time.Now()
	session := func() {
		for i := range 10 {
			epoch++
			at = at.Add(time.Millisecond)
			id := fmt.Sprintf("d%d", i)
			rec.Record(Event{ID: NewEventID(at), DeviceID: id, At: at, Kind: KindConnect, SessionEpoch: epoch})
			rec.Record(Event{ID: NewEventID(at), DeviceID: id, At: at.Add(time.Microsecond), Kind: KindDisconnect, SessionEpoch: epoch, Reason: ReasonConnectionLost})
		}
	}
	session()
	waitUntil(t, "first events written", 5*time.Second, func() bool { n, _ := countEvents(t, pool); return n == 20 })

	if err := srv.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	session()
	session()
	waitUntil(t, "events spooled", 10*time.Second, func() bool { st, err := os.Stat(spool); return err == nil && st.Size() > 0 })

	srv2 := &pgserver.Server{Dir: srv.Dir, BinDir: srv.BinDir, DieWithParent: true}
	if err := srv2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer srv2.Stop(ctx)
	session()
	waitUntil(t, "spool replayed", 20*time.Second, func() bool { _, err := os.Stat(spool); return os.IsNotExist(err) })
	if err := rec.Close(ctx); err != nil {
		t.Fatal(err)
	}
	total, distinct := countEvents(t, pool)
	if total != 80 || distinct != 80 {
		t.Fatalf("stored %d events (%d distinct), want 80 exactly once", total, distinct)
	}
	var online int
	pool.QueryRow(ctx, `SELECT count(*) FROM devices WHERE online`).Scan(&online)
	if online != 0 {
		t.Fatalf("%d devices online, want 0: the last event of every device is a disconnect", online)
	}
}

// TestRecorderReplaysSpoolOfPreviousRun plays a crash during an outage: the
// next run finds the spool and writes it before anything else.
func TestRecorderReplaysSpoolOfPreviousRun(t *testing.T) {
	_, pool := ownServer(t)
	ctx := context.Background()
	store := NewStore(pool)
	spool := filepath.Join(t.TempDir(), "events.jsonl")
	// A previous run spooled two events and died.
	prev := &spoolFile{path: spool}
	now := time.Now()
	if _, err := prev.append([]Event{
		{ID: NewEventID(now), DeviceID: "x", At: now, Kind: KindRefused, Reason: ReasonAuthFailed},
		{ID: NewEventID(now), DeviceID: "y", At: now, Kind: KindRefused, Reason: ReasonThrottled},
	}); err != nil {
		t.Fatal(err)
	}
	rec, err := NewRecorder(store, RecorderOptions{SpoolPath: spool, FlushInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer rec.Close(ctx)
	waitUntil(t, "spool replayed", 10*time.Second, func() bool { n, _ := countEvents(t, pool); return n == 2 })
	waitUntil(t, "spool removed", 5*time.Second, func() bool { _, err := os.Stat(spool); return os.IsNotExist(err) })
}

// randomText returns n characters that do not compress, so that PostgreSQL
// cannot shrink them under the btree limit the way it would shrink "xxx...".
func randomText(n int) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

type deadLetterRow struct {
	EventID string
	Event   Event
	Bytes   int
	Error   string
}

func deadLetters(t *testing.T, pool *pgxpool.Pool) []deadLetterRow {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT event_id::text, event, event_bytes, error FROM event_dead_letters ORDER BY event_id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []deadLetterRow
	for rows.Next() {
		var d deadLetterRow
		var raw []byte
		if err := rows.Scan(&d.EventID, &raw, &d.Bytes, &d.Error); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(raw, &d.Event); err != nil {
			t.Fatalf("dead letter %s: stored event is not its JSON: %v", d.EventID, err)
		}
		out = append(out, d)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func storedEventIDs(t *testing.T, pool *pgxpool.Pool) map[string]bool {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT id::text FROM device_events`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	ids := map[string]bool{}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids[id] = true
	}
	return ids
}

// refusedEvents returns good events with two that PostgreSQL refuses for their
// content among them: a device id too long for the btree index (SQLSTATE
// 54000) and a NUL byte in the firmware (SQLSTATE 22021).
func refusedEvents(good int) (events []Event, bad map[EventID]string) {
	at := time.Now()
	bad = map[EventID]string{}
	for i := range good {
		at = at.Add(time.Millisecond)
		events = append(events, Event{ID: NewEventID(at), DeviceID: fmt.Sprintf("d%d", i%5), At: at, Kind: KindConnect, SessionEpoch: int64(i + 1)})
		switch i {
		case good / 6:
			e := Event{ID: NewEventID(at), DeviceID: randomText(3500), At: at, Kind: KindRefused, Reason: ReasonAuthFailed}
			events, bad[e.ID] = append(events, e), "SQLSTATE 54000"
		case good * 3 / 4:
			e := Event{ID: NewEventID(at), DeviceID: "d1", At: at, Kind: KindBirth, Firmware: "1.0\x00; DROP TABLE devices"}
			events, bad[e.ID] = append(events, e), "SQLSTATE 22021"
		}
	}
	return events, bad
}

// checkRefusedEvents finds every good event of refusedEvents in
// device_events and the two bad ones, intact, in event_dead_letters.
func checkRefusedEvents(t *testing.T, pool *pgxpool.Pool, events []Event, bad map[EventID]string) {
	t.Helper()
	stored := storedEventIDs(t, pool)
	var missing []string
	for _, e := range events {
		if _, isBad := bad[e.ID]; !isBad && !stored[e.ID.String()] {
			missing = append(missing, fmt.Sprintf("%s (%s %s)", e.ID, e.Kind, e.DeviceID))
		}
	}
	if len(missing) > 0 {
		t.Errorf("%d good events are not in device_events, e.g. %s", len(missing), missing[0])
	}
	if want := len(events) - len(bad); len(stored) != want {
		t.Errorf("device_events holds %d events, want the %d good ones", len(stored), want)
	}
	dead := deadLetters(t, pool)
	if len(dead) != len(bad) {
		t.Fatalf("%d dead letters, want %d: %+v", len(dead), len(bad), dead)
	}
	for _, d := range dead {
		var want *Event
		for i := range events {
			if events[i].ID.String() == d.EventID {
				want = &events[i]
			}
		}
		if want == nil {
			t.Fatalf("dead letter %s is not one of the bad events", d.EventID)
		}
		if !strings.Contains(d.Error, bad[want.ID]) {
			t.Errorf("dead letter %s: error %q, want one with %s", d.EventID, d.Error, bad[want.ID])
		}
		if diff := cmp.Diff(*want, d.Event, cmpopts.EquateApproxTime(time.Microsecond)); diff != "" {
			t.Errorf("dead letter %s: stored event mismatch (-want +got):\n%s", d.EventID, diff)
		}
	}
}

// TestRecorderDeadLettersRefusedEvents writes one batch in which two events
// are refused by PostgreSQL for their content: the other hundred are stored
// anyway, the two are kept in event_dead_letters with their error, and
// nothing waits in the spool.
func TestRecorderDeadLettersRefusedEvents(t *testing.T) {
	pool := pgtest.New(t)
	ctx := context.Background()
	store := NewStore(pool)
	for i := range 5 {
		if _, err := store.insertDevice(ctx, NewDevice{ID: fmt.Sprintf("d%d", i)}, make([]byte, 32)); err != nil {
			t.Fatal(err)
		}
	}
	spool := filepath.Join(t.TempDir(), "events.jsonl")
	// A long flush interval: the events reach the database in one batch, at Close.
	var logs strings.Builder // written by the recorder's goroutine, read after Close
	rec, err := NewRecorder(store, RecorderOptions{SpoolPath: spool, FlushInterval: time.Hour, Registerer: prometheus.NewRegistry(),
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	events, bad := refusedEvents(100)
	for _, e := range events {
		rec.Record(e)
	}
	if err := rec.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkRefusedEvents(t, pool, events, bad)
	checkBoundedLogs(t, logs.String(), "kept in event_dead_letters")
	if n := testutil.ToFloat64(rec.mDead); n != 2 {
		t.Errorf("fleetd_events_dead_lettered_total = %v, want 2", n)
	}
	if n := testutil.ToFloat64(rec.mDropRefused); n != 0 {
		t.Errorf(`fleetd_events_dropped_total{reason="refused"} = %v, want 0`, n)
	}
	if _, err := os.Stat(spool); !os.IsNotExist(err) {
		t.Errorf("spool file exists (%v): refused events must not be spooled", err)
	}
	var online int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM devices WHERE online`).Scan(&online); err != nil {
		t.Fatal(err)
	}
	if online != 5 {
		t.Errorf("%d devices online, want 5: the good connects apply their presence", online)
	}
}

// checkBoundedLogs finds each of want in the recorder's logs, and no line long
// enough to carry a whole refused event: a device must not be able to write
// kilobytes of its choosing into the logs.
func checkBoundedLogs(t *testing.T, logs string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(logs, w) {
			t.Errorf("no log line says %q:\n%s", w, logs)
		}
	}
	for _, line := range strings.Split(logs, "\n") {
		if len(line) > 1500 {
			t.Errorf("log line of %d bytes, want a bounded excerpt: %.300s...", len(line), line)
		}
		if strings.Contains(line, "\x00") || strings.Contains(line, "\x1b") {
			t.Errorf("log line carries raw control characters: %q", line)
		}
	}
}

// TestRecorderDrainsSpoolWithRefusedEvents plays a previous run that spooled
// a refused event among good ones, an unreadable line and, cut by a crash, a
// half-written last line: the next run stores every good event, dead-letters
// the refused ones and removes the spool, instead of replaying it forever.
func TestRecorderDrainsSpoolWithRefusedEvents(t *testing.T) {
	pool := pgtest.New(t)
	ctx := context.Background()
	spool := filepath.Join(t.TempDir(), "events.jsonl")
	prev := &spoolFile{path: spool}
	events, bad := refusedEvents(60)
	if _, err := prev.append(events[:30]); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(spool, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "not json \x1b[2J\x00%s\n", strings.Repeat("z", 5000))
	f.Close()
	if _, err := prev.append(events[30:]); err != nil {
		t.Fatal(err)
	}
	f, _ = os.OpenFile(spool, os.O_WRONLY|os.O_APPEND, 0)
	fmt.Fprint(f, `{"id":"0190`)
	f.Close()

	var logs strings.Builder // written by the recorder's goroutine, read after Close
	rec, err := NewRecorder(NewStore(pool), RecorderOptions{SpoolPath: spool, FlushInterval: 10 * time.Millisecond,
		Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "spool replayed and removed", 10*time.Second, func() bool { _, err := os.Stat(spool); return os.IsNotExist(err) })
	if err := rec.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkBoundedLogs(t, logs.String(), "kept in event_dead_letters", "skipping unreadable line")
	checkRefusedEvents(t, pool, events, bad)
	if n := testutil.ToFloat64(rec.mDead); n != 2 {
		t.Errorf("fleetd_events_dead_lettered_total = %v, want 2", n)
	}
	if n := testutil.ToFloat64(rec.mDropUnreadable); n != 2 {
		t.Errorf(`fleetd_events_dropped_total{reason="unreadable"} = %v, want 2 (the unreadable and the cut line)`, n)
	}
	if err := rec.Ready(ctx); err != nil {
		t.Errorf("Ready after the spool drained: %v", err)
	}
}

// downWriter is a database that can be switched off: while down, every write
// fails the way a refused connection does.
type downWriter struct {
	delay  time.Duration // each write takes this long
	mu     sync.Mutex
	down   bool
	events []Event
}

func (w *downWriter) setDown(down bool) { w.mu.Lock(); w.down = down; w.mu.Unlock() }

func (w *downWriter) err() error {
	if w.down {
		return fmt.Errorf("begin: %w", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED})
	}
	return nil
}

func (w *downWriter) writeEvents(_ context.Context, events []Event) error {
	time.Sleep(w.delay)
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.err(); err != nil {
		return err
	}
	w.events = append(w.events, events...)
	return nil
}

func (w *downWriter) writeDeadLetter(context.Context, deadLetter) (bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err() == nil, w.err()
}

func (w *downWriter) written() int { w.mu.Lock(); defer w.mu.Unlock(); return len(w.events) }

// TestRecorderReadyReportsBehind keeps the database away longer than
// BehindAfter: Ready fails and the oldest-unwritten gauge shows the age,
// until the database is back and the spool drained.
func TestRecorderReadyReportsBehind(t *testing.T) {
	ctx := context.Background()
	w := &downWriter{down: true}
	spool := filepath.Join(t.TempDir(), "events.jsonl")
	rec, err := NewRecorder(w, RecorderOptions{SpoolPath: spool, FlushInterval: 10 * time.Millisecond, BehindAfter: 300 * time.Millisecond,
		Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	defer rec.Close(ctx)
	if err := rec.Ready(ctx); err != nil {
		t.Fatalf("Ready with nothing waiting: %v", err)
	}
	for i := range 3 {
		now := time.Now()
		rec.Record(Event{ID: NewEventID(now), DeviceID: fmt.Sprintf("d%d", i), At: now, Kind: KindRefused, Reason: ReasonThrottled})
	}
	waitUntil(t, "Ready to report the recorder behind", 5*time.Second, func() bool { return rec.Ready(ctx) != nil })
	err = rec.Ready(ctx)
	if !strings.Contains(err.Error(), "event recorder is behind: oldest unwritten event is") || !strings.Contains(err.Error(), "bytes spooled") {
		t.Errorf("Ready error %q does not say how far behind", err)
	}
	if age := testutil.ToFloat64(rec.mOldest); age < 0.3 {
		t.Errorf("fleetd_event_oldest_unwritten_seconds = %v while behind, want at least 0.3", age)
	}

	w.setDown(false)
	waitUntil(t, "Ready once the database is back", 5*time.Second, func() bool { return rec.Ready(ctx) == nil })
	waitUntil(t, "spool drained", 5*time.Second, func() bool { _, err := os.Stat(spool); return os.IsNotExist(err) })
	if age := testutil.ToFloat64(rec.mOldest); age != 0 {
		t.Errorf("fleetd_event_oldest_unwritten_seconds = %v with nothing waiting, want 0", age)
	}
	if n := w.written(); n != 3 {
		t.Errorf("%d events written, want 3", n)
	}
}

// TestRecorderRepairsCutSpoolLine finds a spool whose last line a crash cut:
// the events spooled next must start on a line of their own, or they would be
// lost with the cut one.
func TestRecorderRepairsCutSpoolLine(t *testing.T) {
	ctx := context.Background()
	spool := filepath.Join(t.TempDir(), "events.jsonl")
	if err := os.WriteFile(spool, []byte(`{"id":"0190`), 0o600); err != nil {
		t.Fatal(err)
	}
	rec, err := NewRecorder(&downWriter{down: true}, RecorderOptions{SpoolPath: spool, FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	e := Event{ID: NewEventID(now), DeviceID: "d", At: now, Kind: KindRefused, Reason: ReasonThrottled}
	rec.Record(e)
	rec.Close(ctx)
	data, err := os.ReadFile(spool)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("spool has %d lines, want the cut one and the new event:\n%s", len(lines), data)
	}
	var got Event
	if err := json.Unmarshal([]byte(lines[1]), &got); err != nil || got.ID != e.ID {
		t.Fatalf("second spool line %q: %v; want event %s", lines[1], err, e.ID)
	}
}

type safeToRetryError struct{}

func (safeToRetryError) Error() string     { return "conn busy" }
func (safeToRetryError) SafeToRetry() bool { return true }

// TestDeadLetterClassifyWriteError pins which failures blame the data (the
// batch is bisected and refused events dead-lettered) and which the database
// (the batch waits in the spool).
func TestDeadLetterClassifyWriteError(t *testing.T) {
	closed, err := pgxpool.New(context.Background(), "postgres://fleetd@127.0.0.1:1/fleetd")
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()
	_, closedErr := closed.Exec(context.Background(), "SELECT 1")
	if closedErr == nil {
		t.Fatal("exec on a closed pool succeeded")
	}
	pg := func(code string) error {
		return fmt.Errorf("insert events: %w", &pgconn.PgError{Severity: "ERROR", Code: code, Message: "m"})
	}
	tests := []struct {
		name string
		err  error
		want writeFailure
	}{
		{"connection refused", fmt.Errorf("begin: %w", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}), failUnavailable},
		{"closed pool", closedErr, failUnavailable},
		{"deadline", fmt.Errorf("copy events: %w", context.DeadlineExceeded), failUnavailable},
		{"canceled", context.Canceled, failUnavailable},
		{"connection dropped", fmt.Errorf("insert events: %w", io.ErrUnexpectedEOF), failUnavailable},
		{"conn closed", fmt.Errorf("insert events: %w", pgconn.ErrConnClosed), failUnavailable},
		{"safe to retry", safeToRetryError{}, failUnavailable},
		{"unknown client error", errors.New("something odd"), failUnavailable},
		{"08006 connection failure", pg("08006"), failUnavailable},
		{"25006 read-only standby", pg("25006"), failUnavailable},
		{"28P01 bad password", pg("28P01"), failUnavailable},
		{"3D000 no database", pg("3D000"), failUnavailable},
		{"40001 serialization", pg("40001"), failUnavailable},
		{"40P01 deadlock", pg("40P01"), failUnavailable},
		{"42P01 missing table", pg("42P01"), failUnavailable},
		{"42501 no privilege", pg("42501"), failUnavailable},
		{"53100 disk full", pg("53100"), failUnavailable},
		{"53300 too many connections", pg("53300"), failUnavailable},
		{"55P03 lock not available", pg("55P03"), failUnavailable},
		{"57014 statement timeout", pg("57014"), failUnavailable},
		{"57P01 admin shutdown", pg("57P01"), failUnavailable},
		{"57P03 cannot connect now", pg("57P03"), failUnavailable},
		{"58030 io error", pg("58030"), failUnavailable},
		{"XX000 internal", pg("XX000"), failUnavailable},
		{"malformed sqlstate", pg("5"), failUnavailable},
		{"22021 NUL byte", pg("22021"), failData},
		{"22001 string too long", pg("22001"), failData},
		{"22P02 invalid text", pg("22P02"), failData},
		{"23505 unique violation", pg("23505"), failData},
		{"23514 check violation", pg("23514"), failData},
		{"54000 index row too large", pg("54000"), failData},
		{"P0001 trigger raised", pg("P0001"), failData},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := classifyWriteError(tt.err); got != tt.want {
				t.Errorf("classifyWriteError(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// TestDeadLetterStoredForm checks that what a device chose cannot make the
// dead-letter insert fail or grow without bound.
func TestDeadLetterStoredForm(t *testing.T) {
	tests := []struct {
		name      string
		event     Event
		cause     error
		wantBytes int // 0: the whole JSON
		wantError string
	}{
		{name: "small", event: Event{DeviceID: "d", Kind: KindBirth, Firmware: "1\x00"}, cause: errors.New("ERROR: invalid byte (SQLSTATE 22021)"),
			wantError: "ERROR: invalid byte (SQLSTATE 22021)"},
		{name: "huge device id", event: Event{DeviceID: strings.Repeat("é", 10_000), Kind: KindRefused}, cause: errors.New("too big"),
			wantBytes: deadLetterMaxEvent, wantError: "too big"},
		{name: "error with NUL and bad UTF-8", event: Event{DeviceID: "d"}, cause: errors.New("a\x00b\xffc"), wantError: `a\x00b` + "\uFFFD" + "c"},
		{name: "long error", event: Event{DeviceID: "d"}, cause: errors.New(strings.Repeat("ü", 2000)),
			wantError: strings.Repeat("ü", deadLetterMaxError/2) + "…"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			full, _ := json.Marshal(&tt.event)
			d := newDeadLetter(&tt.event, tt.cause)
			wantBytes := tt.wantBytes
			if wantBytes == 0 {
				wantBytes = len(full)
			}
			if len(d.Event) != wantBytes || d.EventBytes != len(full) || string(d.Event) != string(full[:wantBytes]) {
				t.Errorf("stored %d of %d bytes (EventBytes %d), want the first %d", len(d.Event), len(full), d.EventBytes, wantBytes)
			}
			if d.Error != tt.wantError {
				t.Errorf("error %q, want %q", d.Error, tt.wantError)
			}
		})
	}
}

// TestDeadLetterLogEvery checks the limiter that bounds dead-letter logging:
// one line per interval, carrying the count of the lines held back.
func TestDeadLetterLogEvery(t *testing.T) {
	l := logEvery{every: time.Minute}
	t0 := time.Now()
	type step struct {
		after    time.Duration
		wantOK   bool
		wantHeld int
	}
	for i, s := range []step{{0, true, 0}, {time.Second, false, 0}, {30 * time.Second, false, 0}, {time.Minute, true, 2}, {time.Minute + time.Second, false, 0}, {3 * time.Minute, true, 1}} {
		held, ok := l.allow(t0.Add(s.after))
		if ok != s.wantOK || held != s.wantHeld {
			t.Errorf("step %d (+%s): allow = %d, %v; want %d, %v", i, s.after, held, ok, s.wantHeld, s.wantOK)
		}
	}
}

// TestDeadLetterLogExcerpt checks what a log line may carry of a value a
// device chose: a bounded, escaped start.
func TestDeadLetterLogExcerpt(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"plain", "gw-1", "gw-1"},
		{"control characters", "a\x00\x1b[2J\nb\xff", `a\x00\x1b[2J\nb\xff`},
		{"quotes", `say "hi"`, `say \"hi\"`},
		{"long", strings.Repeat("x", 1000), strings.Repeat("x", logExcerpt) + "…"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := excerpt(tt.in); got != tt.want {
				t.Errorf("excerpt = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestRecorderSpoolKeepsOldestTime follows the time of the spool's first
// event, which Ready reports, through appends and a replay that removes only
// the part of the spool that existed when it started.
func TestRecorderSpoolKeepsOldestTime(t *testing.T) {
	r := &spoolFile{path: filepath.Join(t.TempDir(), "events.jsonl")}
	t0 := time.Now().Add(-time.Hour).Round(0)
	ev := func(d time.Duration) Event {
		return Event{ID: NewEventID(t0.Add(d)), DeviceID: "d", At: t0.Add(d), Kind: KindRefused}
	}
	if _, err := r.append([]Event{ev(2 * time.Second), ev(time.Second), ev(3 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	if want := t0.Add(time.Second); !r.at.Equal(want) {
		t.Fatalf("after the first append: spool time %v, want the oldest event's %v", r.at, want)
	}
	replayed := r.size
	if _, err := r.append([]Event{ev(10 * time.Second), ev(11 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	if want := t0.Add(time.Second); !r.at.Equal(want) {
		t.Fatalf("after a second append: spool time %v, want still %v", r.at, want)
	}
	if err := r.trim(replayed); err != nil {
		t.Fatal(err)
	}
	if want := t0.Add(10 * time.Second); !r.at.Equal(want) {
		t.Fatalf("after the trim: spool time %v, want the first remaining event's %v", r.at, want)
	}
	if err := r.trim(r.size); err != nil {
		t.Fatal(err)
	}
	if !r.at.IsZero() || r.size != 0 {
		t.Fatalf("after the last trim: spool time %v, %d bytes; want none", r.at, r.size)
	}
}

// syncBuffer is a log sink the recorder's goroutines write while a test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// recordN records n events of device d, each a millisecond after the last of
// events, and returns events with them appended.
func recordN(rec *Recorder, events []Event, n int) []Event {
	t0 := time.Now().Add(-time.Minute)
	for range n {
		at := t0.Add(time.Duration(len(events)) * time.Millisecond)
		e := Event{ID: NewEventID(at), DeviceID: fmt.Sprintf("d%04d", len(events)), At: at, Kind: KindRefused, Reason: ReasonThrottled}
		events = append(events, e)
		rec.Record(e)
	}
	return events
}

// checkWrittenInOrder finds each of want written, in want's order. A batch
// may be written twice (a spill copies the batch being written), so only the
// first write of each event counts.
func checkWrittenInOrder(t *testing.T, written, want []Event) {
	t.Helper()
	seen := map[EventID]bool{}
	var got []string
	for _, e := range written {
		if !seen[e.ID] {
			seen[e.ID] = true
			got = append(got, e.DeviceID)
		}
	}
	var wantIDs []string
	for _, e := range want {
		wantIDs = append(wantIDs, e.DeviceID)
	}
	if diff := cmp.Diff(wantIDs, got); diff != "" {
		t.Errorf("written events mismatch (-want +got):\n%s", diff)
	}
}

func spoolLineCount(t *testing.T, path string) int {
	t.Helper()
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(data), "\n")
}

// TestRecorderSpoolCap fills a small spool while the database is down: the
// spool stops at its cap, MaxBuffered events wait in memory and the newest
// beyond them are dropped, and all of it shows in Ready, in the metrics and
// in one log line per interval. Once the database is back, what was kept is
// written in order and the recorder is ready again.
func TestRecorderSpoolCap(t *testing.T) {
	ctx := context.Background()
	w := &downWriter{down: true}
	spool := filepath.Join(t.TempDir(), "events.jsonl")
	var logs syncBuffer
	const maxBuffered, maxSpool = 10, 2048
	rec, err := NewRecorder(w, RecorderOptions{SpoolPath: spool, MaxSpoolBytes: maxSpool, MaxBuffered: maxBuffered,
		FlushInterval: 10 * time.Millisecond, BehindAfter: time.Hour, Registerer: prometheus.NewRegistry(),
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer rec.Close(ctx)
	if n := testutil.ToFloat64(rec.mSpoolMax); n != maxSpool {
		t.Errorf("fleetd_event_spool_max_bytes = %v, want %d", n, maxSpool)
	}

	events := recordN(rec, nil, 100)
	// The gauges and counters move one after the other: wait until every
	// event is accounted for (spooled, buffered or dropped), then check each.
	waitUntil(t, "the spool at its cap, the buffer full and the rest dropped", 5*time.Second, func() bool {
		return testutil.ToFloat64(rec.mFull) == 1 && testutil.ToFloat64(rec.mBuffered) == maxBuffered &&
			testutil.ToFloat64(rec.mSpool) > 0 && int(testutil.ToFloat64(rec.mDropFull))+spoolLineCount(t, spool)+maxBuffered == 100
	})
	spooled := spoolLineCount(t, spool)
	st, err := os.Stat(spool)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > maxSpool || spooled == 0 {
		t.Fatalf("spool holds %d events in %d bytes, want some, at most %d bytes", spooled, st.Size(), maxSpool)
	}
	if n := testutil.ToFloat64(rec.mSpool); n != float64(st.Size()) {
		t.Errorf("fleetd_event_spool_bytes = %v, want %d", n, st.Size())
	}
	wantDropped := 100 - spooled - maxBuffered
	if n := testutil.ToFloat64(rec.mDropFull); n != float64(wantDropped) {
		t.Errorf(`fleetd_events_dropped_total{reason="spool_full"} = %v, want %d (100 recorded, %d spooled, %d buffered)`,
			n, wantDropped, spooled, maxBuffered)
	}
	err = rec.Ready(ctx)
	if err == nil || !strings.Contains(err.Error(), "event spool is at its cap of 2048 bytes") ||
		!strings.Contains(err.Error(), fmt.Sprintf("%d dropped", wantDropped)) {
		t.Errorf("Ready = %v, want an error naming the spool cap and the events dropped", err)
	}
	waitUntil(t, "a log line about the dropped events", 5*time.Second, func() bool {
		return strings.Contains(logs.String(), "connection events dropped")
	})

	// More events while nothing has changed: dropped at once, and not one
	// log line each.
	events = recordN(rec, events, 50)
	if n := testutil.ToFloat64(rec.mDropFull); n != float64(wantDropped+50) {
		t.Errorf(`fleetd_events_dropped_total{reason="spool_full"} = %v, want %d`, n, wantDropped+50)
	}

	w.setDown(false)
	kept := events[:spooled+maxBuffered]
	waitUntil(t, "the kept events written", 10*time.Second, func() bool { return w.written() == len(kept) })
	waitUntil(t, "Ready once the spool drained", 5*time.Second, func() bool { return rec.Ready(ctx) == nil })
	if n := testutil.ToFloat64(rec.mFull); n != 0 {
		t.Errorf("fleetd_event_spool_full = %v after the spool drained, want 0", n)
	}
	if err := rec.Close(ctx); err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	checkWrittenInOrder(t, w.events, kept)
	if len(w.events) != len(kept) {
		t.Errorf("%d events written, want the %d kept exactly once", len(w.events), len(kept))
	}
	w.mu.Unlock()

	out := logs.String()
	checkBoundedLogs(t, out, "event spool reached its cap", "event spool is below its cap again")
	if n := strings.Count(out, "event spool reached its cap"); n != 1 {
		t.Errorf("%d lines say the spool reached its cap, want 1:\n%s", n, out)
	}
	// One line when the first events were dropped, and one at shutdown for
	// the rest: none per event.
	lines := regexp.MustCompile(`connection events dropped.*dropped_since_last_log=(\d+)`).FindAllStringSubmatch(out, -1)
	total := 0
	for _, l := range lines {
		n, _ := strconv.Atoi(l[1])
		total += n
	}
	if len(lines) != 2 || total != wantDropped+50 {
		t.Errorf("%d lines about dropped events counting %d, want 2 counting %d:\n%s", len(lines), total, wantDropped+50, out)
	}
}

// spoolGate holds the spool's file I/O at one operation, once, until released.
type spoolGate struct {
	op      string
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func newSpoolGate(op string, armed bool) *spoolGate {
	g := &spoolGate{op: op, entered: make(chan struct{}), release: make(chan struct{})}
	g.armed.Store(armed)
	return g
}

func (g *spoolGate) hook(op string) {
	if op == g.op && g.armed.CompareAndSwap(true, false) {
		close(g.entered)
		<-g.release
	}
}

func waitFor(t *testing.T, what string, c <-chan struct{}) {
	t.Helper()
	select {
	case <-c:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

// TestRecorderRecordDoesNotWaitForSpoolIO holds the spool's file I/O (an
// append's fsync, the copy that trims the spool after a replay) and records
// past MaxBuffered meanwhile: Record, Ready and the metrics return at once,
// and every event reaches the database in order once the disk is let go.
func TestRecorderRecordDoesNotWaitForSpoolIO(t *testing.T) {
	tests := []struct {
		name string
		op   string
		// prepare readies the recorder and arms the gate; trigger, on a
		// goroutine of its own so that a Record that waits for the disk fails
		// the test instead of hanging it, makes the recorder enter the gated
		// operation.
		prepare func(t *testing.T, rec *Recorder, w *downWriter, g *spoolGate) []Event
		trigger func(rec *Recorder, w *downWriter, events []Event) []Event
	}{
		{name: "fsync", op: "fsync",
			prepare: func(t *testing.T, rec *Recorder, w *downWriter, g *spoolGate) []Event {
				w.setDown(true)
				g.armed.Store(true)
				return nil
			},
			trigger: func(rec *Recorder, w *downWriter, events []Event) []Event {
				// Spilled by the writer (a failed batch) or the spool
				// goroutine (MaxBuffered), whichever comes first.
				return recordN(rec, events, 10)
			}},
		{name: "trim", op: "trim",
			prepare: func(t *testing.T, rec *Recorder, w *downWriter, g *spoolGate) []Event {
				w.setDown(true)
				events := recordN(rec, nil, 5)
				waitUntil(t, "events spooled", 5*time.Second, func() bool { return testutil.ToFloat64(rec.mSpooled) == 5 })
				g.armed.Store(true)
				return events
			},
			trigger: func(rec *Recorder, w *downWriter, events []Event) []Event {
				w.setDown(false) // replayed, then trimmed
				return events
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			w := &downWriter{}
			g := newSpoolGate(tt.op, false)
			rec, err := NewRecorder(w, RecorderOptions{SpoolPath: filepath.Join(t.TempDir(), "events.jsonl"), MaxBuffered: 10,
				FlushInterval: 10 * time.Millisecond, Registerer: prometheus.NewRegistry(), spoolHook: g.hook})
			if err != nil {
				t.Fatal(err)
			}
			defer rec.Close(ctx)
			events := tt.prepare(t, rec, w, g)
			held := make(chan []Event, 1)
			go func() { held <- tt.trigger(rec, w, events) }()
			waitFor(t, "the spool's "+tt.op, g.entered)
			select {
			case events = <-held:
			case <-time.After(10 * time.Second):
				close(g.release)
				t.Fatalf("Record waited for the spool's %s", tt.op)
			}

			recorded := make(chan struct{})
			go func() {
				defer close(recorded)
				events = recordN(rec, events, 1000)
				_ = rec.Ready(ctx)
				testutil.ToFloat64(rec.mBuffered)
				testutil.ToFloat64(rec.mOldest)
				testutil.ToFloat64(rec.mFull)
			}()
			select {
			case <-recorded:
			case <-time.After(10 * time.Second):
				close(g.release)
				t.Fatalf("Record, Ready or a metric waited for the spool's %s", tt.op)
			}
			close(g.release)
			w.setDown(false)
			waitUntil(t, "every event written", 10*time.Second, func() bool {
				w.mu.Lock()
				defer w.mu.Unlock()
				seen := map[EventID]bool{}
				for _, e := range w.events {
					seen[e.ID] = true
				}
				return len(seen) == len(events)
			})
			if err := rec.Close(ctx); err != nil {
				t.Fatal(err)
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			checkWrittenInOrder(t, w.events, events)
		})
	}
}

// gatedWriter is a database whose event writes wait until released, and
// then fail as unavailable.
type gatedWriter struct {
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (w *gatedWriter) writeEvents(ctx context.Context, _ []Event) error {
	w.once.Do(func() { close(w.entered) })
	<-w.release
	return fmt.Errorf("begin: %w", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED})
}

func (w *gatedWriter) writeDeadLetter(context.Context, deadLetter) (bool, error) {
	return false, errors.New("not reached")
}

// TestRecorderSpillsWhileWriteHangs holds a database write: events past
// MaxBuffered still reach the spool, ahead of them the batch being written,
// and a Close whose deadline passes loses none of them: the next run writes
// every one, in order.
func TestRecorderSpillsWhileWriteHangs(t *testing.T) {
	spool := filepath.Join(t.TempDir(), "events.jsonl")
	w := &gatedWriter{entered: make(chan struct{}), release: make(chan struct{})}
	rec, err := NewRecorder(w, RecorderOptions{SpoolPath: spool, MaxBuffered: 10, FlushInterval: 10 * time.Millisecond,
		WriteTimeout: time.Hour, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	events := recordN(rec, nil, 3)
	waitFor(t, "the first write", w.entered)
	events = recordN(rec, events, 40)
	// Fewer than MaxBuffered events may wait in memory (the writer that
	// would spill them is the one hanging); every other one is spooled,
	// behind the three being written.
	waitUntil(t, "every event past MaxBuffered spooled while the write hangs", 5*time.Second, func() bool {
		rec.mu.Lock()
		buffered, spilling := len(rec.buf), rec.spilling
		rec.mu.Unlock()
		return !spilling && buffered < 10 && spoolLineCount(t, spool)+buffered == len(events)
	})
	events = recordN(rec, events, 5) // in memory when Close gives up
	expired, cancel := context.WithCancel(context.Background())
	cancel()
	if err := rec.Close(expired); !errors.Is(err, context.Canceled) {
		t.Fatalf("Close past its deadline = %v, want context.Canceled", err)
	}
	close(w.release)
	<-rec.done

	next := &downWriter{}
	rec2, err := NewRecorder(next, RecorderOptions{SpoolPath: spool, FlushInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "spool replayed and removed", 5*time.Second, func() bool { _, err := os.Stat(spool); return os.IsNotExist(err) })
	if err := rec2.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkWrittenInOrder(t, next.events, events)
	if len(next.events) != len(events) {
		t.Errorf("%d events written, want %d exactly once", len(next.events), len(events))
	}
}

// TestRecorderKeepsOrderThroughFlappingDatabase records from several
// goroutines while the database goes down and up, with batches small enough
// that spills, replays and failed writes interleave: every event is written,
// and each producer's in the order it recorded them.
func TestRecorderKeepsOrderThroughFlappingDatabase(t *testing.T) {
	// Writes slow enough for spills to overlap them.
	w := &downWriter{delay: time.Millisecond}
	rec, err := NewRecorder(w, RecorderOptions{SpoolPath: filepath.Join(t.TempDir(), "events.jsonl"), MaxBuffered: 50,
		BatchSize: 20, FlushInterval: time.Millisecond, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	const producers, perRound, rounds = 4, 300, 5
	epochs := make([]int64, producers)
	for round := range rounds {
		// Odd rounds record during an outage; even ones into an empty spool
		// and a database that answers, faster than it writes.
		down := round%2 == 1
		w.setDown(down)
		var wg sync.WaitGroup
		for p := range producers {
			wg.Go(func() {
				for i := range perRound {
					if i%10 == 0 {
						time.Sleep(time.Millisecond) // spread the round over several flushes, not for synchronisation
					}
					epochs[p]++
					at := time.Now()
					rec.Record(Event{ID: NewEventID(at), DeviceID: fmt.Sprintf("p%d", p), At: at, Kind: KindRefused,
						Reason: ReasonThrottled, SessionEpoch: epochs[p]})
				}
			})
		}
		wg.Wait()
		if down {
			w.setDown(false)
			waitUntil(t, "the spool replayed", 10*time.Second, func() bool { return testutil.ToFloat64(rec.mSpool) == 0 })
		}
	}
	total := producers * perRound * rounds
	waitUntil(t, "every event written", 20*time.Second, func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		seen := map[EventID]bool{}
		for _, e := range w.events {
			seen[e.ID] = true
		}
		return len(seen) == total
	})
	if err := rec.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	seen := map[EventID]bool{}
	last := map[string]int64{}
	for _, e := range w.events {
		if seen[e.ID] {
			continue // a batch written twice: the first write counts
		}
		seen[e.ID] = true
		if e.SessionEpoch != last[e.DeviceID]+1 {
			t.Fatalf("producer %s: event %d written after event %d", e.DeviceID, e.SessionEpoch, last[e.DeviceID])
		}
		last[e.DeviceID] = e.SessionEpoch
	}
}
