package telemetry

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fleetd/fleetd/internal/pgtest"
)

// waitFor polls cond until it holds or within passes.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func countPoints(t *testing.T, pool *pgxpool.Pool) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM telemetry_raw`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestWriterCreatesMissingPartitions: on a database where retention never
// ran, the first batch finds no partition for its day; the writer creates it
// and stores the batch.
func TestWriterCreatesMissingPartitions(t *testing.T) {
	pool := pgtest.New(t)
	w := NewWriter(NewStore(pool), WriterOptions{FlushInterval: 10 * time.Millisecond})
	now := time.Now().UTC().Truncate(time.Microsecond)
	for i := range 100 {
		w.Enqueue(point(fmt.Sprint("d", i), now, "rssi", float64(-i)))
	}
	waitFor(t, 5*time.Second, "100 points stored", func() bool { return countPoints(t, pool) == 100 })
	if got := testutil.ToFloat64(w.mPartitions); got != 1 {
		t.Errorf("%v partitions created; want today's", got)
	}
	if err := w.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// flakyStore fails like an unreachable database while down is set, and
// refuses, like PostgreSQL refusing its content, any batch holding a device
// named "bad".
type flakyStore struct {
	down    atomic.Bool
	mu      sync.Mutex
	written []Entry
	calls   int
}

func (f *flakyStore) writeBatch(ctx context.Context, batch []Entry) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.down.Load() {
		return errors.New("dial tcp 127.0.0.1:5432: connect: connection refused")
	}
	for _, e := range batch {
		if e.DeviceID == "bad" {
			return fmt.Errorf("insert telemetry: %w", &pgconn.PgError{Code: "22021", Message: "invalid byte sequence"})
		}
	}
	f.written = append(f.written, batch...)
	return nil
}

func (f *flakyStore) ensurePartitions(context.Context, time.Time, time.Time) ([]string, error) {
	return nil, nil
}

func (f *flakyStore) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.written)
}

// TestWriterOutage: while the database is down the writer holds its batch,
// the queue fills and then drops (counted); once the database answers,
// everything kept is written, once.
func TestWriterOutage(t *testing.T) {
	f := &flakyStore{}
	f.down.Store(true)
	w := NewWriter(f, WriterOptions{QueueSize: 20, Writers: 1, BatchSize: 5, FlushInterval: 5 * time.Millisecond})
	kept := 0
	for i := range 100 {
		if w.Enqueue(point("d1", time.Unix(int64(i), 0), "x", 1)) {
			kept++
		}
		time.Sleep(time.Millisecond)
	}
	if kept > 25 || kept < 20 {
		t.Errorf("%d messages kept during the outage; want the queue (20) and at most a batch (5)", kept)
	}
	if got := testutil.ToFloat64(w.mFull); int(got) != 100-kept {
		t.Errorf("%v counted as dropped at a full queue; want %d", got, 100-kept)
	}
	f.down.Store(false)
	waitFor(t, 5*time.Second, "the kept messages written", func() bool { return f.count() == kept })
	if err := w.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if f.count() != kept {
		t.Errorf("%d written; want %d", f.count(), kept)
	}
}

// TestWriterIsolatesRefusedMessages: a message PostgreSQL refuses is
// dropped alone; the rest of its batch is written.
func TestWriterIsolatesRefusedMessages(t *testing.T) {
	f := &flakyStore{}
	w := NewWriter(f, WriterOptions{Writers: 1, BatchSize: 64, FlushInterval: time.Hour})
	for i := range 64 {
		id := "ok"
		if i == 17 {
			id = "bad"
		}
		w.Enqueue(point(id, time.Unix(int64(i), 0), "x", 1))
	}
	waitFor(t, 5*time.Second, "63 written", func() bool { return f.count() == 63 })
	if got := testutil.ToFloat64(w.mRefused); got != 1 {
		t.Errorf("%v refused; want 1", got)
	}
	w.Close(context.Background())
}

// TestWriterCloseGivesUp: with the database down at shutdown, Close returns
// by its deadline and counts what it could not write.
func TestWriterCloseGivesUp(t *testing.T) {
	f := &flakyStore{}
	f.down.Store(true)
	w := NewWriter(f, WriterOptions{Writers: 1, BatchSize: 5, FlushInterval: time.Millisecond})
	for i := range 12 {
		w.Enqueue(point("d1", time.Unix(int64(i), 0), "x", 1))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	w.Close(ctx)
	if time.Since(start) > 2*time.Second {
		t.Errorf("Close took %s", time.Since(start))
	}
	if got := testutil.ToFloat64(w.mShutdown); got != 12 {
		t.Errorf("%v counted as lost at shutdown; want 12", got)
	}
}
