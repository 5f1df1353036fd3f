package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/internal/pgserver"
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
	prev := &Recorder{opts: RecorderOptions{SpoolPath: spool}}
	prev.mSpool, prev.mSpooled = discardGauge(), discardCounter()
	now := time.Now()
	if err := prev.appendSpoolLocked([]Event{
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

func discardGauge() prometheus.Gauge { return prometheus.NewGauge(prometheus.GaugeOpts{Name: "g"}) }
func discardCounter() prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Name: "c"})
}
