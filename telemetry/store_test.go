package telemetry

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

var day0 = time.Date(2025, 3, 1, 0, 0, 0, 0, time.UTC)

// at is a time on day0.
func at(h, m, s int) time.Time {
	return day0.Add(time.Duration(h)*time.Hour + time.Duration(m)*time.Minute + time.Duration(s)*time.Second)
}

func point(device string, t time.Time, metric string, v float64) Entry {
	return Entry{DeviceID: device, At: t, Message: Message{Metrics: []Metric{{metric, v}}}}
}

func newTestStore(t *testing.T) (*Store, *pgxpool.Pool) {
	t.Helper()
	pool := pgtest.New(t)
	s := NewStore(pool)
	if _, err := s.ensurePartitions(context.Background(), day0, day0.AddDate(0, 0, 1)); err != nil {
		t.Fatal(err)
	}
	return s, pool
}

func write(t *testing.T, s *Store, batch ...Entry) {
	t.Helper()
	if err := s.writeBatch(context.Background(), batch); err != nil {
		t.Fatalf("writeBatch: %v", err)
	}
}

type rollupRow struct {
	Bucket              time.Time
	Count               int64
	Min, Max, Sum, Last float64
	LastAt              time.Time
}

func rollups(t *testing.T, pool *pgxpool.Pool, tr tier, device, metric string) []rollupRow {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT bucket, count, min, max, sum, last, last_at FROM `+tr.table+`
		WHERE device_id = $1 AND metric = $2 ORDER BY 1`, device, metric)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []rollupRow
	for rows.Next() {
		var r rollupRow
		if err := rows.Scan(&r.Bucket, &r.Count, &r.Min, &r.Max, &r.Sum, &r.Last, &r.LastAt); err != nil {
			t.Fatal(err)
		}
		r.Bucket, r.LastAt = r.Bucket.UTC(), r.LastAt.UTC()
		out = append(out, r)
	}
	return out
}

// rollUp runs the rollup job as of now.
func rollUp(t *testing.T, s *Store, now time.Time) RollupReport {
	t.Helper()
	rep, err := (&RollupJob{Now: func() time.Time { return now }}).Apply(context.Background(), s)
	if err != nil {
		t.Fatalf("rollup at %s: %v", now.Format(time.TimeOnly), err)
	}
	if !rep.Ran {
		t.Fatalf("rollup at %s did not run", now.Format(time.TimeOnly))
	}
	return rep
}

// minuteSeries reads a device's metric at step 1m over day0.
func minuteSeries(t *testing.T, s *Store, device, metric string) []Point {
	t.Helper()
	got, err := s.Series(context.Background(), SeriesQuery{DeviceID: device, Metric: metric, Step: StepMinute, From: at(0, 0, 0), To: at(23, 0, 0)})
	if err != nil {
		t.Fatal(err)
	}
	for i := range got.Points {
		got.Points[i].At = got.Points[i].At.UTC()
	}
	return got.Points
}

// TestRollupsCombineAcrossBatches: points of one minute arriving in several
// batches, one of them older than what is stored, add up to the rollup of all
// of them; the latest value is the latest point's, whatever the batch order.
// The API answers the same before the rollup (from raw rows) and after it.
func TestRollupsCombineAcrossBatches(t *testing.T) {
	s, pool := newTestStore(t)
	addDevice(t, pool, "d1", "gw", "1.0", true, at(12, 0, 0))
	write(t, s, point("d1", at(12, 0, 10), "rssi", -60), point("d1", at(12, 0, 20), "rssi", -70), point("d2", at(12, 0, 15), "rssi", -40))
	write(t, s, point("d1", at(12, 0, 40), "rssi", -50), point("d1", at(12, 0, 5), "rssi", -80))
	write(t, s, point("d1", at(12, 1, 0), "rssi", -65))

	wantMinute := []rollupRow{
		{Bucket: at(12, 0, 0), Count: 4, Min: -80, Max: -50, Sum: -260, Last: -50, LastAt: at(12, 0, 40)},
		{Bucket: at(12, 1, 0), Count: 1, Min: -65, Max: -65, Sum: -65, Last: -65, LastAt: at(12, 1, 0)},
	}
	wantHour := []rollupRow{{Bucket: at(12, 0, 0), Count: 5, Min: -80, Max: -50, Sum: -325, Last: -65, LastAt: at(12, 1, 0)}}
	wantPoints := func() []Point {
		var ps []Point
		for _, r := range wantMinute {
			ps = append(ps, Point{At: r.Bucket, Value: r.Sum / float64(r.Count), Rollup: &Rollup{Count: r.Count, Min: r.Min, Max: r.Max, Sum: r.Sum, Last: r.Last}})
		}
		return ps
	}
	if diff := cmp.Diff(wantPoints(), minuteSeries(t, s, "d1", "rssi")); diff != "" {
		t.Errorf("before the rollup: minute series mismatch (-want +got):\n%s", diff)
	}
	if got := rollups(t, pool, minuteTier, "d1", "rssi"); len(got) != 0 {
		t.Errorf("rollup rows before the rollup ran: %+v", got)
	}
	rollUp(t, s, at(12, 5, 0))
	check := func(when string) {
		t.Helper()
		if diff := cmp.Diff(wantMinute, rollups(t, pool, minuteTier, "d1", "rssi")); diff != "" {
			t.Errorf("%s: minute rollup mismatch (-want +got):\n%s", when, diff)
		}
		if diff := cmp.Diff(wantHour, rollups(t, pool, hourTier, "d1", "rssi")); diff != "" {
			t.Errorf("%s: hour rollup mismatch (-want +got):\n%s", when, diff)
		}
		if diff := cmp.Diff(wantPoints(), minuteSeries(t, s, "d1", "rssi")); diff != "" {
			t.Errorf("%s: minute series mismatch (-want +got):\n%s", when, diff)
		}
		var v float64
		var latest time.Time
		if err := pool.QueryRow(context.Background(), `SELECT value, at FROM telemetry_latest WHERE device_id = 'd1' AND metric = 'rssi'`).Scan(&v, &latest); err != nil {
			t.Fatal(err)
		}
		if v != -65 || !latest.Equal(at(12, 1, 0)) {
			t.Errorf("%s: latest %v at %v; want -65 at 12:01", when, v, latest)
		}
	}
	check("rolled up")

	// A batch written again (its commit was lost, or a retry after an outage),
	// and one that overlaps the stored points, add only what is new: they
	// come after their minutes were rolled up, so their writes add the new
	// points to the rollups.
	write(t, s, point("d1", at(12, 0, 40), "rssi", -50), point("d1", at(12, 0, 5), "rssi", -80))
	write(t, s, point("d1", at(12, 1, 0), "rssi", -65))
	check("batches replayed")
	write(t, s, point("d1", at(12, 0, 40), "rssi", -50), point("d1", at(12, 0, 50), "rssi", -90))
	wantMinute[0] = rollupRow{Bucket: at(12, 0, 0), Count: 5, Min: -90, Max: -50, Sum: -350, Last: -90, LastAt: at(12, 0, 50)}
	wantHour[0] = rollupRow{Bucket: at(12, 0, 0), Count: 6, Min: -90, Max: -50, Sum: -415, Last: -65, LastAt: at(12, 1, 0)}
	check("a batch overlapping the stored points")
	rollUp(t, s, at(12, 10, 0))
	check("rolled up again")
}

// TestLinkKeepsTheLatestReport: link fields a message does not report keep
// their value; an older report changes nothing.
func TestLinkKeepsTheLatestReport(t *testing.T) {
	s, pool := newTestStore(t)
	write(t, s,
		Entry{DeviceID: "d1", At: at(10, 0, 0), Message: Message{Link: Link{BSSID: "aa:aa:aa:aa:aa:aa", SSID: "shop", Band: "2.4", Channel: 6}}},
		Entry{DeviceID: "d1", At: at(10, 0, 1), Message: Message{Link: Link{Channel: 11}}})
	rollUp(t, s, at(10, 0, 1).Add(latestLag+time.Millisecond)) // copied between rollups
	write(t, s, Entry{DeviceID: "d1", At: at(10, 0, 2), Message: Message{Link: Link{BSSID: "bb:bb:bb:bb:bb:bb"}}})
	rollUp(t, s, at(10, 5, 0))
	write(t, s, Entry{DeviceID: "d1", At: at(9, 0, 0), Message: Message{Link: Link{SSID: "old", Channel: 1}}}) // late
	rollUp(t, s, at(10, 6, 0))
	var got Link
	var when time.Time
	if err := pool.QueryRow(context.Background(), `SELECT bssid, ssid, band, channel, at FROM telemetry_link WHERE device_id = 'd1'`).
		Scan(&got.BSSID, &got.SSID, &got.Band, &got.Channel, &when); err != nil {
		t.Fatal(err)
	}
	if want := (Link{BSSID: "bb:bb:bb:bb:bb:bb", SSID: "shop", Band: "2.4", Channel: 11}); got != want || !when.Equal(at(10, 0, 2)) {
		t.Errorf("link %+v at %v; want %+v at 10:00:02", got, when, want)
	}
}

func addDevice(t *testing.T, pool *pgxpool.Pool, id, model, firmware string, online bool, lastSeen time.Time) {
	t.Helper()
	if _, err := pool.Exec(context.Background(), `INSERT INTO devices (id, model, firmware, online, last_seen) VALUES ($1, $2, $3, $4, $5)`,
		id, model, firmware, online, lastSeen); err != nil {
		t.Fatal(err)
	}
}

func TestSeries(t *testing.T) {
	s, pool := newTestStore(t)
	addDevice(t, pool, "d1", "gw", "1.0", true, at(12, 0, 0))
	write(t, s, point("d1", at(12, 0, 10), "rssi", -60), point("d1", at(12, 0, 30), "rssi", -70), point("d1", at(12, 2, 0), "rssi", -50),
		point("d1", at(12, 0, 10).Add(time.Microsecond), "snr", 30))
	ctx := context.Background()
	s.SetClock(func() time.Time { return at(12, 30, 0) })

	raw, err := s.Series(ctx, SeriesQuery{DeviceID: "d1", Metric: "rssi"})
	if err != nil {
		t.Fatal(err)
	}
	want := Series{DeviceID: "d1", Metric: "rssi", From: at(11, 30, 0), To: at(12, 30, 0),
		Points: []Point{{At: at(12, 0, 10), Value: -60}, {At: at(12, 0, 30), Value: -70}, {At: at(12, 2, 0), Value: -50}}}
	normalise := func(s *Series) {
		for i := range s.Points {
			s.Points[i].At = s.Points[i].At.UTC()
		}
	}
	normalise(&raw)
	if diff := cmp.Diff(want, raw); diff != "" {
		t.Errorf("raw series mismatch (-want +got):\n%s", diff)
	}

	minutes, err := s.Series(ctx, SeriesQuery{DeviceID: "d1", Metric: "rssi", Step: StepMinute, From: at(12, 0, 30), To: at(12, 5, 0)})
	if err != nil {
		t.Fatal(err)
	}
	normalise(&minutes)
	want = Series{DeviceID: "d1", Metric: "rssi", From: at(12, 0, 30), To: at(12, 5, 0), Step: "1m", Points: []Point{
		{At: at(12, 0, 0), Value: -65, Rollup: &Rollup{Count: 2, Min: -70, Max: -60, Sum: -130, Last: -70}},
		{At: at(12, 2, 0), Value: -50, Rollup: &Rollup{Count: 1, Min: -50, Max: -50, Sum: -50, Last: -50}},
	}}
	if diff := cmp.Diff(want, minutes); diff != "" {
		t.Errorf("minute series mismatch (-want +got):\n%s", diff)
	}
	// Rolled up up to 12:01: 12:00 from the rollup, 12:02 from raw rows.
	rollUp(t, s, at(12, 1, 10))
	minutes, err = s.Series(ctx, SeriesQuery{DeviceID: "d1", Metric: "rssi", Step: StepMinute, From: at(12, 0, 30), To: at(12, 5, 0)})
	if err != nil {
		t.Fatal(err)
	}
	normalise(&minutes)
	if diff := cmp.Diff(want, minutes); diff != "" {
		t.Errorf("minute series, rolled up to 12:01, mismatch (-want +got):\n%s", diff)
	}
	hours, err := s.Series(ctx, SeriesQuery{DeviceID: "d1", Metric: "rssi", Step: StepHour, From: at(11, 0, 0), To: at(12, 30, 0)})
	if err != nil {
		t.Fatal(err)
	}
	normalise(&hours)
	wantHours := Series{DeviceID: "d1", Metric: "rssi", From: at(11, 0, 0), To: at(12, 30, 0), Step: "1h", Points: []Point{
		{At: at(12, 0, 0), Value: -60, Rollup: &Rollup{Count: 3, Min: -70, Max: -50, Sum: -180, Last: -50}},
	}}
	if diff := cmp.Diff(wantHours, hours); diff != "" {
		t.Errorf("hour series, half rolled up, mismatch (-want +got):\n%s", diff)
	}

	for _, tc := range []struct {
		name  string
		q     SeriesQuery
		field string
	}{
		{"bad metric", SeriesQuery{DeviceID: "d1", Metric: "RSSI"}, "metric"},
		{"no metric", SeriesQuery{DeviceID: "d1"}, "metric"},
		{"bad step", SeriesQuery{DeviceID: "d1", Metric: "rssi", Step: "5m"}, "step"},
		{"reversed", SeriesQuery{DeviceID: "d1", Metric: "rssi", From: at(12, 0, 0), To: at(11, 0, 0)}, "from"},
		{"too many minutes", SeriesQuery{DeviceID: "d1", Metric: "rssi", Step: StepMinute, From: day0, To: day0.AddDate(0, 0, 4)}, "from"},
	} {
		_, err := s.Series(ctx, tc.q)
		var ve *fleet.ValidationError
		if !errors.As(err, &ve) || ve.Field != tc.field {
			t.Errorf("%s: error %v; want a validation error naming %s", tc.name, err, tc.field)
		}
	}
	if _, err := s.Series(ctx, SeriesQuery{DeviceID: "nobody", Metric: "rssi"}); !errors.Is(err, fleet.ErrNotFound) {
		t.Errorf("unknown device: %v; want ErrNotFound", err)
	}

	// More raw points than one answer holds.
	var many []Entry
	for i := range MaxPoints + 1 {
		many = append(many, point("d1", at(13, 0, 0).Add(time.Duration(i)*time.Millisecond), "busy", float64(i)))
	}
	write(t, s, many...)
	_, err = s.Series(ctx, SeriesQuery{DeviceID: "d1", Metric: "busy", From: at(13, 0, 0), To: at(14, 0, 0)})
	var ve *fleet.ValidationError
	if !errors.As(err, &ve) || ve.Field != "from" {
		t.Errorf("%d raw points: %v; want a validation error naming from", MaxPoints+1, err)
	}
	if got, err := s.Series(ctx, SeriesQuery{DeviceID: "d1", Metric: "busy", From: at(13, 0, 0), To: at(14, 0, 0), Step: StepMinute}); err != nil || len(got.Points) != 1 || got.Points[0].Count != MaxPoints+1 {
		t.Errorf("the same at 1m: %+v, %v", got.Points, err)
	}
}

func TestSummary(t *testing.T) {
	s, pool := newTestStore(t)
	now := at(12, 30, 0)
	s.SetClock(func() time.Time { return now })
	addDevice(t, pool, "a", "gw", "1.0", true, at(1, 0, 0))      // online
	addDevice(t, pool, "b", "gw", "2.0", false, at(12, 0, 0))    // seen within the hour
	addDevice(t, pool, "c", "cam", "2.0", true, at(12, 0, 0))    // online
	addDevice(t, pool, "gone", "gw", "1.0", false, at(10, 0, 0)) // not seen for 2.5 h: left out
	link := func(id, bssid string, ch int) Entry {
		return Entry{DeviceID: id, At: at(12, 0, 0), Message: Message{Link: Link{BSSID: bssid, Channel: ch}}}
	}
	write(t, s, link("a", "aa:aa:aa:aa:aa:aa", 6), link("b", "aa:aa:aa:aa:aa:aa", 6), link("gone", "aa:aa:aa:aa:aa:aa", 6))
	write(t, s, point("a", at(12, 1, 0), "rssi", -80), point("b", at(12, 1, 0), "rssi", -60), point("c", at(12, 1, 0), "rssi", -40),
		point("gone", at(12, 1, 0), "rssi", -90), point("a", at(12, 2, 0), "rssi", -70))
	rollUp(t, s, at(12, 2, 30)) // latest values and links copied; nothing rolled up yet
	ctx := context.Background()
	for _, tc := range []struct {
		groupBy string
		want    []Group
	}{
		{"", []Group{{Key: "", Count: 3, Mean: -170.0 / 3, Min: -70, Max: -40}}},
		{"firmware", []Group{{Key: "2.0", Count: 2, Mean: -50, Min: -60, Max: -40}, {Key: "1.0", Count: 1, Mean: -70, Min: -70, Max: -70}}},
		{"model", []Group{{Key: "gw", Count: 2, Mean: -65, Min: -70, Max: -60}, {Key: "cam", Count: 1, Mean: -40, Min: -40, Max: -40}}},
		{"channel", []Group{{Key: "6", Count: 2, Mean: -65, Min: -70, Max: -60}, {Key: "", Count: 1, Mean: -40, Min: -40, Max: -40}}},
		{"bssid", []Group{{Key: "aa:aa:aa:aa:aa:aa", Count: 2, Mean: -65, Min: -70, Max: -60}, {Key: "", Count: 1, Mean: -40, Min: -40, Max: -40}}},
	} {
		got, err := s.Summary(ctx, SummaryQuery{Metric: "rssi", GroupBy: tc.groupBy})
		if err != nil {
			t.Fatal(err)
		}
		want := Summary{Metric: "rssi", GroupBy: tc.groupBy, Since: now.Add(-time.Hour), Devices: 3, Groups: tc.want}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("group_by %q mismatch (-want +got):\n%s", tc.groupBy, diff)
		}
	}
	var ve *fleet.ValidationError
	if _, err := s.Summary(ctx, SummaryQuery{Metric: "rssi", GroupBy: "ssid; DROP TABLE devices"}); !errors.As(err, &ve) || ve.Field != "group_by" {
		t.Errorf("bad group_by: %v", err)
	}
	if _, err := s.Summary(ctx, SummaryQuery{Metric: ""}); !errors.As(err, &ve) || ve.Field != "metric" {
		t.Errorf("no metric: %v", err)
	}
}

func partitions(t *testing.T, pool *pgxpool.Pool) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		WHERE i.inhparent = 'telemetry_raw'::regclass ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for rows.Next() {
		var n string
		rows.Scan(&n)
		out = append(out, n)
	}
	return out
}

// TestRetention: partitions are created ahead and a day is dropped whole
// once it ended longer ago than the raw retention and was rolled up; rollups
// and latest values are deleted past theirs, in bounded rounds; a second
// replica finding the lock taken does nothing.
func TestRetention(t *testing.T) {
	pool := pgtest.New(t)
	s := NewStore(pool)
	ctx := context.Background()
	now := at(12, 0, 0)
	r := &Retention{Raw: 24 * time.Hour, Minute: 2 * time.Hour, Hour: 72 * time.Hour, Batch: 3, Rounds: 2, Now: func() time.Time { return now }}

	rep, err := r.Apply(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"telemetry_raw_p20250301", "telemetry_raw_p20250302", "telemetry_raw_p20250303"}; !rep.Ran || !cmp.Equal(rep.Created, want) {
		t.Fatalf("first run %+v; want partitions %v created", rep, want)
	}
	var batch []Entry
	for i := range 10 {
		batch = append(batch, point("d1", at(9, i, 0), "rssi", float64(i))) // ten minute rows, one hour row
	}
	batch = append(batch, point("d1", at(11, 0, 0), "rssi", 0), point("d1", day0.AddDate(0, 0, 1).Add(time.Hour), "rssi", 1))
	write(t, s, batch...)
	rollUp(t, s, day0.AddDate(0, 0, 1).Add(2*time.Hour))

	// 12:00: minute rows older than 10:00 go, three per round, two rounds a run.
	rep, err = r.Apply(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Deleted["telemetry_minute"] != 6 || len(rep.Dropped) != 0 || len(rep.Created) != 0 {
		t.Errorf("second run %+v; want 6 minute rows deleted and no partition changes", rep)
	}
	rep, _ = r.Apply(ctx, s)
	if rep.Deleted["telemetry_minute"] != 4 {
		t.Errorf("third run deleted %d minute rows; want the remaining 4", rep.Deleted["telemetry_minute"])
	}

	// Three days later: 1 and 2 March ended more than a day ago, but are
	// kept until they are rolled up.
	now = at(12, 0, 0).AddDate(0, 0, 3)
	if rep, err = r.Apply(ctx, s); err != nil || len(rep.Dropped) != 1 {
		t.Errorf("rolled up to 2 March 01:59: dropped %v, %v; want 1 March only", rep.Dropped, err)
	}
	rollUp(t, s, now)
	rep, err = r.Apply(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"telemetry_raw_p20250302"}; !cmp.Equal(rep.Dropped, want) {
		t.Errorf("dropped %v; want %v", rep.Dropped, want)
	}
	if got, want := partitions(t, pool), []string{"telemetry_raw_p20250303", "telemetry_raw_p20250304", "telemetry_raw_p20250305", "telemetry_raw_p20250306"}; !cmp.Equal(got, want) {
		t.Errorf("partitions %v; want %v", got, want)
	}
	var points, hours, latest int
	pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM telemetry_raw), (SELECT count(*) FROM telemetry_hour), (SELECT count(*) FROM telemetry_latest)`).Scan(&points, &hours, &latest)
	if points != 0 || hours != 1 || latest != 1 {
		// The hour rows of 1 March (09:00, 11:00) are past 72 h; 2 March 01:00
		// is not, and neither is the latest value, of then.
		t.Errorf("after three days: %d points, %d hour rows, %d latest values; want 0, 1, 1", points, hours, latest)
	}

	// Another replica holds the lock: nothing is done.
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1)`, int64(retentionLock)); err != nil {
		t.Fatal(err)
	}
	now = now.AddDate(0, 0, 5)
	if rep, err := r.Apply(ctx, s); err != nil || rep.Ran || len(rep.Dropped) > 0 {
		t.Errorf("with the lock held elsewhere: %+v, %v; want nothing done", rep, err)
	}
	conn.Exec(ctx, `SELECT pg_advisory_unlock($1)`, int64(retentionLock))
}
