package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fleetd/fleetd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// replica is one bus on its own pool, as a fleetd replica has.
type replica struct {
	bus  *Bus
	pool *pgxpool.Pool

	mu       sync.Mutex
	got      []string // items received from others
	resynced int
}

func newReplica(t *testing.T, url, node string) *replica {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	r := &replica{bus: NewBus(pool, node, nil, nil), pool: pool}
	r.bus.Handle("item", func(items []json.RawMessage) {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, it := range items {
			var s string
			_ = json.Unmarshal(it, &s)
			r.got = append(r.got, s)
		}
	})
	r.bus.OnResync(func(context.Context) { r.mu.Lock(); r.resynced++; r.mu.Unlock() })
	if err := r.bus.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.bus.Close(context.Background()) })
	return r
}

func (r *replica) received() (others []string, resynced int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.got...), r.resynced
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestBusReachesEveryReplica: what one replica publishes reaches the
// others, in order, and comes back to it recognised as its own and dropped
// unread — even when two replicas share a node name.
func TestBusReachesEveryReplica(t *testing.T) {
	url := pgtest.URL(t)
	a, b, c := newReplica(t, url, "node"), newReplica(t, url, "node"), newReplica(t, url, "other")
	start := time.Now()
	if err := a.bus.Publish(context.Background(), "item", "x1", "x2"); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*replica{b, c} {
		waitUntil(t, "the items on another replica", func() bool { got, _ := r.received(); return len(got) == 2 })
		if got, _ := r.received(); got[0] != "x1" || got[1] != "x2" {
			t.Fatalf("received %v, want [x1 x2]", got)
		}
	}
	t.Logf("delivered to two replicas in %s", time.Since(start).Round(time.Millisecond))
	waitUntil(t, "the sender's own copy", func() bool { return counterValue(t, a.bus.mOwn) == 1 })
	if got, _ := a.received(); len(got) != 0 {
		t.Fatalf("the sender took its own items for another replica's: %v", got)
	}
	if own := counterValue(t, b.bus.mOwn) + counterValue(t, c.bus.mOwn); own != 0 {
		t.Fatalf("%v of another replica's messages taken for the receiver's own", own)
	}
}

// TestBusBatches: queued items are sent in messages under NOTIFY's limit,
// none lost; an item too big for any message is refused.
func TestBusBatches(t *testing.T) {
	url := pgtest.URL(t)
	a, b := newReplica(t, url, "a"), newReplica(t, url, "b")
	const n = 2000
	for i := range n {
		a.bus.Enqueue("item", fmt.Sprintf("%04d-%s", i, strings.Repeat("p", 100)))
	}
	waitUntil(t, "every queued item", func() bool { got, _ := b.received(); return len(got) == n })
	got, _ := b.received()
	for i, s := range got {
		if !strings.HasPrefix(s, fmt.Sprintf("%04d-", i)) {
			t.Fatalf("item %d is %.10s…: out of order or lost", i, s)
		}
	}
	if sent := counterValue(t, a.bus.mSent); sent < n*110/maxPayload || sent > n/10 {
		t.Fatalf("%v messages for %d items of ~110 bytes: want them packed near the %d-byte limit", sent, n, maxPayload)
	}
	err := a.bus.Publish(context.Background(), "item", strings.Repeat("x", maxPayload))
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("an oversized item: %v, want ErrTooLarge", err)
	}
}

// TestBusResyncs: a replica whose listening connection is killed listens
// again, runs its resync hooks (it may have missed something) and hears the
// others again.
func TestBusResyncs(t *testing.T) {
	url := pgtest.URL(t)
	a, b := newReplica(t, url, "a"), newReplica(t, url, "b")
	var killed int
	if err := a.pool.QueryRow(context.Background(), `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE query = 'LISTEN `+channel+`' AND datname = current_database()`).Scan(&killed); err != nil || killed != 2 {
		t.Fatalf("terminated %d listeners (%v), want both", killed, err)
	}
	waitUntil(t, "both replicas to resync", func() bool {
		_, ra := a.received()
		_, rb := b.received()
		return ra == 1 && rb == 1 && a.bus.Listening() && b.bus.Listening()
	})
	if err := a.bus.Publish(context.Background(), "item", "after"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "an item after the reconnect", func() bool { got, _ := b.received(); return len(got) == 1 && got[0] == "after" })
}

// TestClockFollowsTheDatabase: the database clock, read through the offset,
// agrees with the database within a round trip.
func TestClockFollowsTheDatabase(t *testing.T) {
	pool := pgtest.New(t)
	c, err := NewClock(context.Background(), pool)
	if err != nil {
		t.Fatal(err)
	}
	var db time.Time
	before := c.Now()
	if err := pool.QueryRow(context.Background(), "SELECT clock_timestamp()").Scan(&db); err != nil {
		t.Fatal(err)
	}
	after := c.Now()
	const slack = 5 * time.Millisecond
	if db.Before(before.Add(-slack)) || db.After(after.Add(slack)) {
		t.Fatalf("database time %s outside [%s, %s] (offset %s)", db, before, after, c.Offset())
	}
}

func counterValue(t *testing.T, c prometheus.Counter) int {
	t.Helper()
	return int(testutil.ToFloat64(c))
}
