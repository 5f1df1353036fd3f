package telemetry

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/pgtest"
)

// oracle is what the rollups must hold for a set of stored messages,
// computed in Go.
type oracle struct {
	minute, hour map[rollupKey]rollupRow
	latest       map[[2]string]struct {
		v  float64
		at time.Time
	}
}

type rollupKey struct {
	device, metric string
	bucket         time.Time
}

func newOracle(entries []Entry) oracle {
	o := oracle{minute: map[rollupKey]rollupRow{}, hour: map[rollupKey]rollupRow{}, latest: map[[2]string]struct {
		v  float64
		at time.Time
	}{}}
	for _, e := range entries {
		for _, m := range e.Metrics {
			for _, tb := range []struct {
				rows map[rollupKey]rollupRow
				step time.Duration
			}{{o.minute, time.Minute}, {o.hour, time.Hour}} {
				k := rollupKey{e.DeviceID, m.Name, e.At.UTC().Truncate(tb.step)}
				r, ok := tb.rows[k]
				if !ok {
					r = rollupRow{Bucket: k.bucket, Min: m.Value, Max: m.Value}
				}
				r.Count++
				r.Sum += m.Value
				r.Min, r.Max = min(r.Min, m.Value), max(r.Max, m.Value)
				if !e.At.Before(r.LastAt) {
					r.Last, r.LastAt = m.Value, e.At.UTC()
				}
				tb.rows[k] = r
			}
			k := [2]string{e.DeviceID, m.Name}
			if l, ok := o.latest[k]; !ok || e.At.After(l.at) {
				o.latest[k] = struct {
					v  float64
					at time.Time
				}{m.Value, e.At.UTC()}
			}
		}
	}
	return o
}

// allRollups reads a rollup table whole.
func allRollups(t *testing.T, pool *pgxpool.Pool, tr tier) map[rollupKey]rollupRow {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT device_id, metric, bucket, count, min, max, sum, last, last_at FROM `+tr.table)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[rollupKey]rollupRow{}
	for rows.Next() {
		var k rollupKey
		var r rollupRow
		if err := rows.Scan(&k.device, &k.metric, &k.bucket, &r.Count, &r.Min, &r.Max, &r.Sum, &r.Last, &r.LastAt); err != nil {
			t.Fatal(err)
		}
		k.bucket = k.bucket.UTC()
		r.Bucket, r.LastAt = k.bucket, r.LastAt.UTC()
		out[k] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func (o oracle) check(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	if diff := cmp.Diff(o.minute, allRollups(t, pool, minuteTier), cmp.AllowUnexported(rollupKey{})); diff != "" {
		t.Errorf("minute rollups mismatch (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(o.hour, allRollups(t, pool, hourTier), cmp.AllowUnexported(rollupKey{})); diff != "" {
		t.Errorf("hour rollups mismatch (-want +got):\n%s", diff)
	}
	rows, err := pool.Query(context.Background(), `SELECT device_id, metric, value, at FROM telemetry_latest`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		var k [2]string
		var v float64
		var when time.Time
		if err := rows.Scan(&k[0], &k[1], &v, &when); err != nil {
			t.Fatal(err)
		}
		n++
		if w, ok := o.latest[k]; !ok || w.v != v || !w.at.Equal(when) {
			t.Errorf("latest %v: %v at %v; want %+v", k, v, when.UTC(), w)
		}
	}
	if n != len(o.latest) {
		t.Errorf("%d latest values; want %d", n, len(o.latest))
	}
}

// TestRollupLatePoints: points that arrive for a minute already rolled up,
// or sealed and not yet rolled up, are added once — by their own write —
// and every query answers the same before and after the rollup that follows.
func TestRollupLatePoints(t *testing.T) {
	s, pool := newTestStore(t)
	addDevice(t, pool, "d1", "gw", "1.0", true, at(12, 0, 0))
	var stored []Entry
	store := func(batch ...Entry) {
		t.Helper()
		write(t, s, batch...)
		for _, e := range batch {
			if !containsKey(stored, e) {
				stored = append(stored, e)
			}
		}
	}
	store(point("d1", at(12, 0, 10), "rssi", -60), point("d1", at(12, 0, 20), "rssi", -70), point("d1", at(12, 3, 0), "rssi", -50))
	rep := rollUp(t, s, at(12, 2, 30))
	if !rep.RolledTo.Equal(at(12, 2, 0)) || !rep.SealedTo.Equal(at(12, 2, 0)) {
		t.Fatalf("rolled up to %v, sealed to %v; want 12:02", rep.RolledTo, rep.SealedTo)
	}
	newOracle(stored[:2]).check(t, pool)

	// After an outage: a batch of the rolled-up minute, one of whose
	// points is stored already.
	store(point("d1", at(12, 0, 20), "rssi", -70), point("d1", at(12, 0, 30), "rssi", -90))
	lateRows := func() (n int) {
		pool.QueryRow(context.Background(), `SELECT count(*) FROM telemetry_raw WHERE late`).Scan(&n)
		return n
	}
	if n := lateRows(); n != 1 {
		t.Errorf("%d rows marked late; want the new one", n)
	}
	newOracle(before(stored, at(12, 2, 0))).check(t, pool) // the late point is in, 12:03 is not rolled up yet
	if diff := cmp.Diff(seriesOf(newOracle(stored), "d1", "rssi"), minuteSeries(t, s, "d1", "rssi")); diff != "" {
		t.Errorf("minute series after the late batch mismatch (-want +got):\n%s", diff)
	}

	// Sealed past 12:10 but not rolled up (the job stopped between the
	// two): a point of 12:05 is late; queries still count every point once.
	if err := s.seal(context.Background(), at(12, 10, 0)); err != nil {
		t.Fatal(err)
	}
	store(point("d1", at(12, 5, 0), "rssi", -40), point("d1", at(12, 11, 0), "rssi", -45))
	if n := lateRows(); n != 2 {
		t.Errorf("%d rows marked late; want 2", n)
	}
	if diff := cmp.Diff(seriesOf(newOracle(stored), "d1", "rssi"), minuteSeries(t, s, "d1", "rssi")); diff != "" {
		t.Errorf("minute series, sealed but not rolled up, mismatch (-want +got):\n%s", diff)
	}
	hours, err := s.Series(context.Background(), SeriesQuery{DeviceID: "d1", Metric: "rssi", Step: StepHour, From: at(12, 0, 0), To: at(13, 0, 0)})
	if err != nil || len(hours.Points) != 1 || hours.Points[0].Count != 6 || hours.Points[0].Sum != -355 || hours.Points[0].Last != -45 {
		t.Errorf("hour series %+v, %v; want 6 points, sum -355, last -45", hours.Points, err)
	}
	for _, now := range []time.Time{at(12, 20, 0), at(12, 30, 0)} {
		rollUp(t, s, now)
		newOracle(stored).check(t, pool)
		if diff := cmp.Diff(seriesOf(newOracle(stored), "d1", "rssi"), minuteSeries(t, s, "d1", "rssi")); diff != "" {
			t.Errorf("minute series rolled up at %s mismatch (-want +got):\n%s", now.Format(time.TimeOnly), diff)
		}
	}
}

// before returns the entries before t.
func before(entries []Entry, t time.Time) []Entry {
	var out []Entry
	for _, e := range entries {
		if e.At.Before(t) {
			out = append(out, e)
		}
	}
	return out
}

func containsKey(entries []Entry, e Entry) bool {
	for _, o := range entries {
		if o.DeviceID == e.DeviceID && o.At.Equal(e.At) {
			return true
		}
	}
	return false
}

// seriesOf is the minute series the oracle expects for a device's metric.
func seriesOf(o oracle, device, metric string) []Point {
	var ps []Point
	for k, r := range o.minute {
		if k.device == device && k.metric == metric {
			ps = append(ps, Point{At: r.Bucket, Value: r.Sum / float64(r.Count), Rollup: &Rollup{Count: r.Count, Min: r.Min, Max: r.Max, Sum: r.Sum, Last: r.Last}})
		}
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].At.Before(ps[j].At) })
	return ps
}

// TestRollupReplicas: two replicas (two Stores on one database) each run
// the rollup job and two writers, while the clock runs over several minutes:
// writers replay batches (a lost commit) and bring late ones (an outage);
// every message ends up in the rollups exactly once.
func TestRollupReplicas(t *testing.T) {
	pool := pgtest.New(t)
	ctx := context.Background()
	cfg := pool.Config().Copy()
	pool2, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool2.Close)
	stores := []*Store{NewStore(pool), NewStore(pool2)}
	if _, err := stores[0].ensurePartitions(ctx, day0, day0.AddDate(0, 0, 1)); err != nil {
		t.Fatal(err)
	}

	// The simulated clock, in microseconds since 12:00, runs 8 minutes.
	var clock atomic.Int64
	now := func() time.Time { return at(12, 0, 0).Add(time.Duration(clock.Load()) * time.Microsecond) }
	const end = 8 * time.Minute
	stop := make(chan struct{})
	go func() {
		defer close(stop)
		for clock.Load() < end.Microseconds() {
			clock.Add((500 * time.Millisecond).Microseconds())
			time.Sleep(5 * time.Millisecond)
		}
	}()

	var mu sync.Mutex
	var stored []Entry
	var late atomic.Int64
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := stores[w%2]
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			last := map[string]time.Time{}
			// next is a new key for device: strictly after its last one.
			next := func(device string, when time.Time) time.Time {
				if l, ok := last[device]; ok && !when.After(l) {
					when = l.Add(time.Microsecond)
				}
				last[device] = when
				return when
			}
			var prev []Entry
			for {
				select {
				case <-stop:
					return
				default:
				}
				var batch []Entry
				replay := false
				switch r := rng.IntN(10); {
				case r == 0 && prev != nil: // the previous batch again
					batch, replay = prev, true
				case r == 1: // late: three minutes behind the clock
					late.Add(1)
					for d := range 5 {
						id := fmt.Sprintf("late-%d-%d", w, d)
						batch = append(batch, point(id, next(id, now().Add(-3*time.Minute)), "rssi", float64(-rng.IntN(90))))
					}
				default:
					for d := range 20 {
						id := fmt.Sprintf("d-%d-%d", w, d)
						batch = append(batch, Entry{DeviceID: id, At: next(id, now()), Message: Message{
							Metrics: []Metric{{"rssi", float64(-rng.IntN(90))}, {"uptime", float64(rng.IntN(1000))}},
							Link:    Link{BSSID: fmt.Sprintf("aa:bb:cc:dd:ee:%02x", rng.IntN(4)), Channel: 1 + rng.IntN(11)},
						}})
					}
				}
				if err := s.writeBatch(ctx, batch); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				mu.Lock()
				if !replay {
					stored = append(stored, batch...)
				}
				mu.Unlock()
				prev = batch
			}
		}()
	}
	var ran [2]atomic.Int64
	for i, s := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			job := &RollupJob{Now: now, Grace: 5 * time.Second}
			for {
				select {
				case <-stop:
					return
				default:
				}
				rep, err := job.Apply(ctx, s)
				if err != nil {
					t.Errorf("rollup %d: %v", i, err)
					return
				}
				if rep.Ran {
					ran[i].Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	rep := rollUp(t, stores[1], now().Add(time.Hour))
	t.Logf("%d messages stored (%d late batches), rollup runs %d and %d, rolled up to %s", len(stored), late.Load(), ran[0].Load(), ran[1].Load(), rep.RolledTo.Format(time.TimeOnly))
	var lateRows int
	pool.QueryRow(ctx, `SELECT count(*) FROM telemetry_raw WHERE late`).Scan(&lateRows)
	if late.Load() > 0 && lateRows == 0 {
		t.Errorf("no row was marked late")
	}
	var rows int
	pool.QueryRow(ctx, `SELECT count(*) FROM telemetry_raw`).Scan(&rows)
	if rows != len(stored) {
		t.Errorf("%d raw rows; want %d", rows, len(stored))
	}
	newOracle(stored).check(t, pool)
}
