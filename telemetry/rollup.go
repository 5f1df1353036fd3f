package telemetry

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/internal/advisory"
)

// RollupJob computes the per-minute and per-hour rollups, the latest values and
// the links from the raw rows (telemetry_raw), on one replica at a time.
//
// Why a job rather than rollups updated by each batch write: a message then
// costs its writer one row (and one index entry) instead of a dozen — its
// points' minute, hour and latest rows and its link row, updated again by
// every batch of the minute — which is what lets a 2-core machine store
// 50 000 messages a second. The job rolls up a closed minute's rows with one
// statement, a row per device and metric instead of a row per message; the
// rollups are derived from durable rows, so a replica that crashes loses no
// aggregate (as in-writer aggregation in memory would), and replicas do not
// need to agree on which one saw a device. The price is that rollups lag:
// queries make up for it by computing the minutes not yet rolled up from the
// raw rows (Store.Series), and the latest values and links are copied every
// run, so they are current to within Every.
//
// Exactly once, with any number of replicas: a minute is sealed (sealed_to
// moves past it) under the exclusive advisory.TelemetrySeal lock, which
// every batch write holds shared, once it ended Grace ago. A batch that
// brings a row of a sealed minute (one delayed by an outage) marks it late
// and adds it to the rollups itself, in its own transaction; the job adds
// the sealed rows that are not late and moves rolled_to past them in one
// transaction, which locks the watermarks' row. A row is thus added by
// whichever of the two stored it, once. The latest values and links are
// idempotent (the newest wins), so copying them twice is harmless.
type RollupJob struct {
	// Every is how often Run works. Default 10 s.
	Every time.Duration
	// Grace is how long after its end a minute is sealed: rows that arrive
	// later (in batches delayed by the database) are late, which costs
	// them the slower write. Default 10 s.
	Grace time.Duration
	// MaxSpan bounds the raw time range one transaction rolls up, and
	// Rounds the transactions of one run, so that a backlog (after the
	// database or every replica was down) is worked off over several runs.
	// Default 5 minutes and 12.
	MaxSpan time.Duration
	Rounds  int
	// Now is the clock; nil is time.Now.
	Now        func() time.Time
	Logger     *slog.Logger
	Registerer prometheus.Registerer

	mBehind prometheus.Gauge
	mErrors prometheus.Counter
}

// rollupLock is the advisory lock of a rollup run.
const rollupLock = advisory.TelemetryRollup

// latestLag is how far behind the clock the copy of latest values and links
// stays, so that it does not pass rows still being committed (the rollup
// copies those it misses).
const latestLag = 2 * time.Second

func (r *RollupJob) defaults() {
	orDefault(&r.Every, 10*time.Second)
	orDefault(&r.Grace, 10*time.Second)
	orDefault(&r.MaxSpan, 5*time.Minute)
	orDefault(&r.Rounds, 12)
	orDefault(&r.Logger, slog.New(slog.DiscardHandler))
	if r.Now == nil {
		r.Now = time.Now
	}
	if r.mBehind == nil {
		r.mBehind = prometheus.NewGauge(prometheus.GaugeOpts{Name: "fleetd_telemetry_rollup_behind_seconds",
			Help: "How far the telemetry rollups are behind the clock (minutes after it are computed from raw rows by the queries); set by the replica that ran the rollup."})
		r.mErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_telemetry_rollup_errors_total", Help: "Telemetry rollup runs that failed."})
		if r.Registerer != nil {
			r.Registerer.MustRegister(r.mBehind, r.mErrors)
		}
	}
}

// Run rolls up every r.Every until ctx ends.
func (r *RollupJob) Run(ctx context.Context, s *Store) {
	r.defaults()
	t := time.NewTicker(r.Every)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		_, err := r.Apply(ctx, s)
		switch {
		case err != nil && ctx.Err() == nil:
			r.mErrors.Inc()
			if !failing {
				r.Logger.Error("telemetry rollup failed; retrying every run (queries compute the minutes not rolled up from raw rows)", "err", err, "every", r.Every.String())
			}
			failing = true
		case err == nil && failing:
			failing = false
			r.Logger.Info("telemetry rollup works again")
		}
	}
}

// RollupReport is what one rollup run did.
type RollupReport struct {
	Ran bool // false: another replica holds the lock
	// SealedTo, RolledTo and LatestTo are the watermarks after the run.
	SealedTo, RolledTo, LatestTo time.Time
}

// Apply runs the rollup once at r.Now(), if no other replica is running it:
// it seals the minutes that ended Grace ago, rolls up what is sealed (at most
// Rounds spans of MaxSpan), and copies the latest values and links of the
// rows since.
func (r *RollupJob) Apply(ctx context.Context, s *Store) (RollupReport, error) {
	r.defaults()
	now := r.Now()
	var rep RollupReport
	ran, err := s.withLock(ctx, rollupLock, func() error {
		if err := s.seal(ctx, now.Add(-r.Grace).UTC().Truncate(time.Minute)); err != nil {
			return err
		}
		// Spans without rows (an idle fleet, a stop) cost an index probe
		// each and are not counted, up to maxEmptySpans a run.
		for rounds, empty := 0, 0; rounds < r.Rounds && empty < maxEmptySpans; {
			done, rolled, err := s.rollUp(ctx, r.MaxSpan)
			if err != nil {
				return err
			}
			if done {
				break
			}
			if rolled {
				rounds++
			} else {
				empty++
			}
		}
		if err := s.copyLatest(ctx, now.Add(-latestLag), r.MaxSpan); err != nil {
			return err
		}
		if err := s.pool.QueryRow(ctx, `SELECT sealed_to, rolled_to, latest_to FROM telemetry_rollup_state`).
			Scan(&rep.SealedTo, &rep.RolledTo, &rep.LatestTo); err != nil {
			return fmt.Errorf("read telemetry watermarks: %w", err)
		}
		r.mBehind.Set(now.Sub(rep.RolledTo).Seconds())
		return nil
	})
	rep.Ran = ran
	return rep, err
}

// sealLockTimeout bounds the wait for the exclusive seal lock. While the job
// waits, new batch writes queue behind it: it gives up rather than hold them
// for long (a batch transaction that hangs), and seals at the next run.
const sealLockTimeout = "1s"

// seal moves sealed_to forward to to (see RollupJob).
func (s *Store) seal(ctx context.Context, to time.Time) error {
	var sealed time.Time
	if err := s.pool.QueryRow(ctx, `SELECT sealed_to FROM telemetry_rollup_state`).Scan(&sealed); err != nil {
		return fmt.Errorf("read the telemetry seal: %w", err)
	}
	if !sealed.Before(to) {
		return nil
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, fmt.Sprintf(`SET LOCAL lock_timeout = '%s'; SELECT pg_advisory_xact_lock(%d)`, sealLockTimeout, int64(advisory.TelemetrySeal))); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE telemetry_rollup_state SET sealed_to = $1 WHERE sealed_to < $1`, to)
		return err
	})
	if err != nil {
		return fmt.Errorf("seal telemetry minutes before %s: %w", to.Format(time.RFC3339), err)
	}
	return nil
}

// rollUpSQL adds the rows of [$1, $2) that are not late to the rollups, the
// latest values and the links. It reads the rows where they are stored, which
// lets every aggregate hash (see storedMinutesSQL); the writer's late rows,
// not yet visible to a statement that inserts them, take addSQL.
var rollUpSQL = `WITH ` + storedMinutesSQL + `,
minute AS (` + minuteTier.addSQL("m") + `
), hour AS (` + hourTier.addSQL("m") + `
), latest AS (` + latestSQL("m") + `
) ` + storedLinkSQL

// epoch is where the watermarks start (see the migration).
var epoch = time.Unix(0, 0).UTC()

// maxEmptySpans bounds the spans without rows one run passes.
const maxEmptySpans = 10_000

// rollUp rolls up the sealed rows after rolled_to, at most maxSpan of them,
// and reports whether nothing is left to roll up and whether the span held
// rows.
func (s *Store) rollUp(ctx context.Context, maxSpan time.Duration) (done, rolled bool, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var sealed, lo time.Time
		// The row lock makes two jobs (were the advisory lock lost)
		// take turns, the second seeing the first's watermark.
		if err := tx.QueryRow(ctx, `SELECT sealed_to, rolled_to FROM telemetry_rollup_state FOR UPDATE`).Scan(&sealed, &lo); err != nil {
			return err
		}
		if !lo.Before(sealed) {
			done = true
			return nil
		}
		hi := sealed
		if lo.Equal(epoch) {
			// The first run: start at the first row, if any (a scan of
			// the table, once).
			var first *time.Time
			if err := tx.QueryRow(ctx, `SELECT min(at) FROM telemetry_raw WHERE at < $1 AND NOT late`, hi).Scan(&first); err != nil {
				return err
			}
			if first != nil {
				lo = maxTime(lo, first.UTC().Truncate(time.Minute))
			}
			if first == nil {
				lo = hi
			}
		}
		hi = minTime(hi, lo.Add(maxSpan))
		if lo.Before(hi) {
			if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM telemetry_raw WHERE at >= $1 AND at < $2 AND NOT late)`, lo, hi).Scan(&rolled); err != nil {
				return err
			}
		}
		if rolled {
			if _, err := tx.Exec(ctx, rollUpSQL, lo, hi); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `UPDATE telemetry_rollup_state SET rolled_to = $1, latest_to = greatest(latest_to, $1)`, hi); err != nil {
			return err
		}
		done = !hi.Before(sealed)
		return nil
	})
	if err != nil {
		return false, false, fmt.Errorf("roll up telemetry: %w", err)
	}
	return done, rolled, nil
}

// copyLatestSQL copies the latest values and links of the rows of [$1, $2)
// that are not late (late ones were copied by their writer): each device's
// latest row of each set of metric names is found by a hashed max(at), and
// only those rows are unnested.
var copyLatestSQL = `WITH l AS (
	SELECT device_id, names, max(at) AS at FROM telemetry_raw WHERE at >= $1 AND at < $2 AND NOT late GROUP BY device_id, names
), m AS (
	SELECT l.device_id, u.metric, u.value AS last, l.at AS last_at
	FROM l JOIN telemetry_raw r ON r.device_id = l.device_id AND r.at = l.at AND r.at >= $1 AND r.at < $2,
		unnest(r.names, r.vals) AS u(metric, value)
), latest AS (` + latestSQL("m") + `
) ` + storedLinkSQL

// copyLatest copies the latest values and links of the rows after both
// latest_to and rolled_to and before hi (at most maxSpan of them).
func (s *Store) copyLatest(ctx context.Context, hi time.Time, maxSpan time.Duration) error {
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var rolled, latest time.Time
		if err := tx.QueryRow(ctx, `SELECT rolled_to, latest_to FROM telemetry_rollup_state FOR UPDATE`).Scan(&rolled, &latest); err != nil {
			return err
		}
		// Behind by more than maxSpan (the rollup is catching up): the
		// latest rows are the ones that count, the older ones are copied
		// by the rollup when it reaches them.
		lo := maxTime(maxTime(rolled, latest), hi.Add(-maxSpan))
		if !lo.Before(hi) {
			return nil
		}
		if _, err := tx.Exec(ctx, copyLatestSQL, lo, hi); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE telemetry_rollup_state SET latest_to = $1`, hi)
		return err
	})
	if err != nil {
		return fmt.Errorf("copy latest telemetry: %w", err)
	}
	return nil
}

// pointsSQL is the points (device_id, at, metric, value) of the raw rows of
// src.
func pointsSQL(src string) string {
	return `SELECT r.device_id, r.at, u.metric, u.value FROM ` + src + ` r, unnest(r.names, r.vals) AS u(metric, value)`
}

// storedMinutesSQL is the CTEs p (the points of the stored rows of [$1, $2)
// that are not late) and m (their minute aggregates: device_id, metric,
// bucket, count, min, max, sum, last, last_at), for the rollup job.
//
// Why not addSQL's aggregates: last as array_agg(value ORDER BY at DESC) is
// an ordered aggregate, which PostgreSQL cannot hash, so every point of the
// span (a minute of a 50 000 messages/s fleet is 9 M of them) went through a
// sort that spilled to disk — most of the database's CPU per stored message
// (bench/RESULTS.md). Here every aggregate hashes, and last is read from the
// row of last_at, one primary-key lookup per device, metric and minute.
var storedMinutesSQL = `p AS (
	` + pointsSQL("telemetry_raw") + ` WHERE r.at >= $1 AND r.at < $2 AND NOT r.late
), g AS (
	SELECT device_id, metric, date_trunc('minute', at, 'UTC') AS bucket, count(*) AS count, min(value) AS min, max(value) AS max,
		sum(value) AS sum, max(at) AS last_at
	FROM p GROUP BY 1, 2, 3
), m AS (
	SELECT device_id, metric, bucket, count, min, max, sum, (
		SELECT r.vals[array_position(r.names, g.metric)] FROM telemetry_raw r
		WHERE r.device_id = g.device_id AND r.at = g.last_at AND r.at >= $1 AND r.at < $2
	) AS last, last_at
	FROM g
)`

// storedLinkSQL is the tail of a statement (after its other CTEs, from the
// comma on) that keeps each device's latest link from the stored rows of
// [$1, $2) that are not late, as linkSQL does, with hashed aggregates: the
// time of each field's latest report, then that field read from that row.
var storedLinkSQL = func() string {
	field := func(col string) string {
		return fmt.Sprintf(`(SELECT r.%[1]s FROM telemetry_raw r WHERE r.device_id = k.device_id AND r.at = k.%[1]s_at AND r.at >= $1 AND r.at < $2)`, col)
	}
	at := func(col string) string {
		return fmt.Sprintf(`max(at) FILTER (WHERE %[1]s IS NOT NULL) AS %[1]s_at`, col)
	}
	return `, k AS (
	SELECT device_id, max(at) AS at, ` + at("bssid") + `, ` + at("ssid") + `, ` + at("band") + `, ` + at("channel") + `
	FROM telemetry_raw WHERE at >= $1 AND at < $2 AND NOT late AND (bssid IS NOT NULL OR ssid IS NOT NULL OR band IS NOT NULL OR channel IS NOT NULL)
	GROUP BY device_id
)
	INSERT INTO telemetry_link AS t (device_id, at, bssid, ssid, band, channel)
		SELECT device_id, at, ` + field("bssid") + `, ` + field("ssid") + `, ` + field("band") + `, ` + field("channel") + `
		FROM k ORDER BY device_id
		ON CONFLICT (device_id) DO UPDATE SET
			bssid = coalesce(EXCLUDED.bssid, t.bssid), ssid = coalesce(EXCLUDED.ssid, t.ssid),
			band = coalesce(EXCLUDED.band, t.band), channel = coalesce(EXCLUDED.channel, t.channel), at = EXCLUDED.at
		WHERE EXCLUDED.at > t.at`
}()

// addSQL is the tail of a statement (after "WITH src AS (…), ") that adds
// the raw rows of src to the minute and hour rollups, the latest values and
// the links.
func addSQL(src string) string {
	return `p AS (` + pointsSQL(src) + `
), m AS (
	SELECT device_id, metric, date_trunc('minute', at, 'UTC') AS bucket, count(*) AS count, min(value) AS min, max(value) AS max,
		sum(value) AS sum, (array_agg(value ORDER BY at DESC))[1] AS last, max(at) AS last_at
	FROM p GROUP BY 1, 2, 3
), minute AS (` + minuteTier.addSQL("m") + `
), hour AS (` + hourTier.addSQL("m") + `
), latest AS (` + latestSQL("m") + `
) ` + linkSQL(src)
}

// addSQL adds minute aggregates (m: device_id, metric, bucket, count, min,
// max, sum, last, last_at) to the tier's rows: counts and sums add up, min
// and max combine, and last is the value of the latest point whichever
// addition brought it, so additions combine in any order. The rows are
// sorted so that two writers of the same rows lock them in the same order.
func (t tier) addSQL(m string) string {
	return fmt.Sprintf(`INSERT INTO %[1]s AS t (device_id, metric, bucket, count, min, max, sum, last, last_at)
		SELECT device_id, metric, date_trunc('%[2]s', bucket, 'UTC'), sum(count), min(min), max(max), sum(sum),
			(array_agg(last ORDER BY last_at DESC))[1], max(last_at)
		FROM %[3]s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
		ON CONFLICT (device_id, metric, bucket) DO UPDATE SET
			count = t.count + EXCLUDED.count, min = least(t.min, EXCLUDED.min), max = greatest(t.max, EXCLUDED.max),
			sum = t.sum + EXCLUDED.sum,
			last = CASE WHEN EXCLUDED.last_at >= t.last_at THEN EXCLUDED.last ELSE t.last END,
			last_at = greatest(t.last_at, EXCLUDED.last_at)`, t.table, t.unit, m)
}

// latestSQL keeps the latest value of each device's metrics from m
// (device_id, metric, last, last_at); an older value changes nothing, and
// is not even locked.
func latestSQL(m string) string {
	return `INSERT INTO telemetry_latest AS t (metric, device_id, value, at)
		SELECT DISTINCT ON (metric, device_id) metric, device_id, last, last_at FROM ` + m + ` n
		WHERE NOT EXISTS (SELECT 1 FROM telemetry_latest l WHERE l.metric = n.metric AND l.device_id = n.device_id COLLATE "default" AND l.at >= n.last_at)
		ORDER BY metric, device_id, last_at DESC
		ON CONFLICT (metric, device_id) DO UPDATE SET value = EXCLUDED.value, at = EXCLUDED.at WHERE EXCLUDED.at > t.at`
}

// linkSQL keeps each device's latest link from the raw rows of src: a field
// not reported (NULL) keeps its stored value, and an older report changes
// nothing.
func linkSQL(src string) string {
	last := func(col string) string {
		return fmt.Sprintf(`(array_agg(%[1]s ORDER BY at DESC) FILTER (WHERE %[1]s IS NOT NULL))[1]`, col)
	}
	return `INSERT INTO telemetry_link AS t (device_id, at, bssid, ssid, band, channel)
		SELECT device_id, max(at), ` + last("bssid") + `, ` + last("ssid") + `, ` + last("band") + `, ` + last("channel") + `
		FROM ` + src + ` WHERE bssid IS NOT NULL OR ssid IS NOT NULL OR band IS NOT NULL OR channel IS NOT NULL
		GROUP BY device_id ORDER BY device_id
		ON CONFLICT (device_id) DO UPDATE SET
			bssid = coalesce(EXCLUDED.bssid, t.bssid), ssid = coalesce(EXCLUDED.ssid, t.ssid),
			band = coalesce(EXCLUDED.band, t.band), channel = coalesce(EXCLUDED.channel, t.channel), at = EXCLUDED.at
		WHERE EXCLUDED.at > t.at`
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// rolledTo reads the rollup watermark: the raw rows before it are rolled up.
func (s *Store) rolledTo(ctx context.Context) (time.Time, error) {
	var t time.Time
	if err := s.pool.QueryRow(ctx, `SELECT rolled_to FROM telemetry_rollup_state`).Scan(&t); err != nil {
		return t, fmt.Errorf("read the telemetry rollup watermark: %w", err)
	}
	return t, nil
}
