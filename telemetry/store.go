package telemetry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/advisory"
)

// Store is telemetry's PostgreSQL storage: the batch write with its rollups,
// the queries of the API, and the partitions and deletes of retention.
type Store struct {
	pool *pgxpool.Pool
	now  func() time.Time // nil: time.Now
}

// NewStore returns the store on pool.
func NewStore(pool *pgxpool.Pool) *Store { return &Store{pool: pool} }

// tier is one rollup table: its name and its bucket (date_trunc's unit).
type tier struct {
	table, unit string
	step        time.Duration
}

var (
	minuteTier = tier{"telemetry_minute", "minute", time.Minute}
	hourTier   = tier{"telemetry_hour", "hour", time.Hour}
)

// upsert is the statement adding a batch's points, grouped by bucket, to the
// tier's rows: counts and sums add up, min and max combine, and last is the
// value of the latest point whichever batch brought it. The rows are sorted so
// that two replicas writing the same rows lock them in the same order.
func (t tier) upsert(from string) string {
	return fmt.Sprintf(`INSERT INTO %[1]s AS t (device_id, metric, bucket, count, min, max, sum, last, last_at)
		SELECT device_id, metric, date_trunc('%[2]s', at, 'UTC'), count(*), min(value), max(value), sum(value),
			(array_agg(value ORDER BY at DESC))[1], max(at)
		FROM %[3]s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
		ON CONFLICT (device_id, metric, bucket) DO UPDATE SET
			count = t.count + EXCLUDED.count, min = least(t.min, EXCLUDED.min), max = greatest(t.max, EXCLUDED.max),
			sum = t.sum + EXCLUDED.sum,
			last = CASE WHEN EXCLUDED.last_at >= t.last_at THEN EXCLUDED.last ELSE t.last END,
			last_at = greatest(t.last_at, EXCLUDED.last_at)`, t.table, t.unit, from)
}

// ingestSQL moves the copied points into telemetry_points and, from the
// points actually inserted (a point already stored, from a batch written
// twice, returns nothing), updates both rollups and the latest values, in one
// statement.
var ingestSQL = `WITH ins AS (
	INSERT INTO telemetry_points (device_id, metric, at, value)
	SELECT device_id, metric, at, value FROM telemetry_in
	ON CONFLICT DO NOTHING
	RETURNING device_id, metric, at, value
), minute AS (` + minuteTier.upsert("ins") + `
), hour AS (` + hourTier.upsert("ins") + `
)
INSERT INTO telemetry_latest AS t (metric, device_id, value, at)
SELECT DISTINCT ON (metric, device_id) metric, device_id, value, at FROM ins ORDER BY metric, device_id, at DESC
ON CONFLICT (metric, device_id) DO UPDATE SET value = EXCLUDED.value, at = EXCLUDED.at WHERE EXCLUDED.at > t.at`

// linkSQL keeps each device's latest link; a field not reported (” or 0)
// keeps its stored value, and an older report changes nothing.
const linkSQL = `INSERT INTO telemetry_link AS t (device_id, at, bssid, ssid, band, channel)
	SELECT id, at, nullif(bssid, ''), nullif(ssid, ''), nullif(band, ''), nullif(channel, 0)
	FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::int[]) AS u(id, at, bssid, ssid, band, channel)
	ON CONFLICT (device_id) DO UPDATE SET
		bssid = coalesce(EXCLUDED.bssid, t.bssid), ssid = coalesce(EXCLUDED.ssid, t.ssid),
		band = coalesce(EXCLUDED.band, t.band), channel = coalesce(EXCLUDED.channel, t.channel), at = EXCLUDED.at
	WHERE EXCLUDED.at > t.at`

// writeBatch stores a batch in one transaction: its points are copied (COPY)
// into a temporary table, then ingestSQL and linkSQL apply them. Writing the
// same batch twice stores it once.
func (s *Store) writeBatch(ctx context.Context, batch []Entry) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// Telemetry is not spooled either (see Writer): a commit lost to a
		// database crash costs what the queue would lose, and the writer
		// does not wait for the WAL flush.
		if _, err := tx.Exec(ctx, `SET LOCAL synchronous_commit = off;
			CREATE TEMP TABLE IF NOT EXISTS telemetry_in
			(device_id text, metric text, at timestamptz, value double precision) ON COMMIT DELETE ROWS`); err != nil {
			return fmt.Errorf("prepare telemetry copy: %w", err)
		}
		i, j := 0, 0
		if _, err := tx.CopyFrom(ctx, pgx.Identifier{"telemetry_in"}, []string{"device_id", "metric", "at", "value"},
			pgx.CopyFromFunc(func() ([]any, error) {
				for i < len(batch) && j == len(batch[i].Metrics) {
					i, j = i+1, 0
				}
				if i == len(batch) {
					return nil, nil
				}
				e, m := &batch[i], batch[i].Metrics[j]
				j++
				return []any{e.DeviceID, m.Name, e.At, m.Value}, nil
			})); err != nil {
			return fmt.Errorf("copy telemetry: %w", err)
		}
		if _, err := tx.Exec(ctx, ingestSQL); err != nil {
			return fmt.Errorf("insert telemetry: %w", err)
		}
		if l := collapseLinks(batch); len(l.ids) > 0 {
			if _, err := tx.Exec(ctx, linkSQL, l.ids, l.at, l.bssid, l.ssid, l.band, l.channel); err != nil {
				return fmt.Errorf("update telemetry links: %w", err)
			}
		}
		return nil
	})
}

// links are a batch's link reports, one per device, as columns.
type links struct {
	ids               []string
	at                []time.Time
	bssid, ssid, band []string
	channel           []int32
}

// collapseLinks merges each device's link reports in a batch, in order: a
// later report's fields replace the earlier ones it reports.
func collapseLinks(batch []Entry) links {
	var l links
	index := map[string]int{}
	for i := range batch {
		e := &batch[i]
		if e.Link == (Link{}) {
			continue
		}
		k, ok := index[e.DeviceID]
		if !ok {
			k = len(l.ids)
			index[e.DeviceID] = k
			l.ids, l.at = append(l.ids, e.DeviceID), append(l.at, e.At)
			l.bssid, l.ssid, l.band, l.channel = append(l.bssid, ""), append(l.ssid, ""), append(l.band, ""), append(l.channel, 0)
		}
		if e.At.After(l.at[k]) {
			l.at[k] = e.At
		}
		for _, f := range []struct {
			dst *string
			src string
		}{{&l.bssid[k], e.Link.BSSID}, {&l.ssid[k], e.Link.SSID}, {&l.band[k], e.Link.Band}} {
			if f.src != "" {
				*f.dst = f.src
			}
		}
		if e.Link.Channel != 0 {
			l.channel[k] = int32(e.Link.Channel)
		}
	}
	return l
}

// writeFailure says what a failed batch write means for its messages.
type writeFailure int

const (
	// failUnavailable: the database could not take the write; the batch is
	// retried as it is (a batch written twice is stored once).
	failUnavailable writeFailure = iota
	// failNoPartition: a point's day has no partition yet (retention has not
	// run since the clock passed the days it created); create it and retry.
	failNoPartition
	// failData: PostgreSQL refused the content of some message.
	failData
)

// classify decides what a failed write means. Messages are checked at the
// edge, so only an error PostgreSQL reports about the data (SQLSTATE class 22,
// data exception; 23, integrity; 54, a limit such as an index row too large)
// blames them; anything else is unavailability, which costs a retry rather
// than losing good messages.
func classify(err error) writeFailure {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || len(pgErr.Code) != 5 {
		return failUnavailable
	}
	switch {
	case pgErr.Code == "23514" && strings.Contains(pgErr.Message, "no partition"):
		return failNoPartition
	case strings.HasPrefix(pgErr.Code, "22"), strings.HasPrefix(pgErr.Code, "23"), strings.HasPrefix(pgErr.Code, "54"):
		return failData
	}
	return failUnavailable
}

// partitionLock serialises the creation and dropping of raw partitions
// (transaction advisory lock).
const partitionLock = advisory.TelemetryPartitions

// partitionName is the partition of telemetry_points holding the UTC day of t.
func partitionName(t time.Time) string {
	return "telemetry_points_p" + t.UTC().Format("20060102")
}

// partitionDay parses a partition's name back to its day.
func partitionDay(name string) (time.Time, bool) {
	day, ok := strings.CutPrefix(name, "telemetry_points_p")
	if !ok {
		return time.Time{}, false
	}
	t, err := time.Parse("20060102", day)
	return t, err == nil
}

// ensurePartitions creates the missing partitions of the UTC days from
// first to last (inclusive) and returns the names it created.
func (s *Store) ensurePartitions(ctx context.Context, first, last time.Time) ([]string, error) {
	return s.alterPartitions(ctx, func(existing []string) (plan []ddl) {
		for day := first.UTC().Truncate(24 * time.Hour); !day.After(last); day = day.Add(24 * time.Hour) {
			if name := partitionName(day); !slices.Contains(existing, name) {
				plan = append(plan, ddl{name, "create", fmt.Sprintf(`CREATE TABLE %s PARTITION OF telemetry_points FOR VALUES FROM ('%s') TO ('%s')`,
					name, day.Format(time.RFC3339), day.Add(24*time.Hour).Format(time.RFC3339))})
			}
		}
		return plan
	})
}

// dropPartitions drops the partitions whose whole day ended before cutoff
// and returns their names.
func (s *Store) dropPartitions(ctx context.Context, cutoff time.Time) ([]string, error) {
	return s.alterPartitions(ctx, func(existing []string) (plan []ddl) {
		for _, name := range existing {
			if day, ok := partitionDay(name); ok && !day.Add(24*time.Hour).After(cutoff) {
				plan = append(plan, ddl{name, "drop", "DROP TABLE " + pgx.Identifier{name}.Sanitize()})
			}
		}
		return plan
	})
}

// ddl is one statement creating or dropping a partition.
type ddl struct{ partition, verb, sql string }

// alterPartitions runs, in one transaction holding partitionLock, the
// statements plan derives from the existing partitions, and returns the
// partitions they changed.
func (s *Store) alterPartitions(ctx context.Context, plan func(existing []string) []ddl) ([]string, error) {
	var changed []string
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		changed = changed[:0]
		existing, err := lockPartitions(ctx, tx)
		if err != nil {
			return err
		}
		for _, d := range plan(existing) {
			if _, err := tx.Exec(ctx, d.sql); err != nil {
				return fmt.Errorf("%s partition %s: %w", d.verb, d.partition, err)
			}
			changed = append(changed, d.partition)
		}
		return nil
	})
	return changed, err
}

// lockPartitions takes partitionLock for the transaction, with a lock
// timeout so that the DDL that follows cannot queue the API's readers behind
// it for long, and lists the partitions.
func lockPartitions(ctx context.Context, tx pgx.Tx) ([]string, error) {
	if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '5s'`); err != nil {
		return nil, fmt.Errorf("lock telemetry partitions: %w", err)
	}
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(partitionLock)); err != nil {
		return nil, fmt.Errorf("lock telemetry partitions: %w", err)
	}
	rows, err := tx.Query(ctx, `SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		WHERE i.inhparent = 'telemetry_points'::regclass ORDER BY 1`)
	if err != nil {
		return nil, fmt.Errorf("list telemetry partitions: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list telemetry partitions: %w", err)
	}
	return names, nil
}

// deleteBefore deletes at most limit rows of table whose column is before
// cutoff (through the column's index on the rollups; by a scan that stops at
// limit on telemetry_latest and telemetry_link, a row per device) and returns
// how many it deleted.
func (s *Store) deleteBefore(ctx context.Context, table, column string, cutoff time.Time, limit int) (int64, error) {
	tag, err := s.pool.Exec(ctx, fmt.Sprintf(`DELETE FROM %[1]s WHERE ctid = ANY (ARRAY(
		SELECT ctid FROM %[1]s WHERE %[2]s < $1 LIMIT $2))`, table, column), cutoff, limit)
	if err != nil {
		return 0, fmt.Errorf("delete old rows of %s: %w", table, err)
	}
	return tag.RowsAffected(), nil
}

// withLock runs f on one pooled connection while it holds the session
// advisory lock key, if no other session holds it; ran says whether f ran.
// A replica that dies holding the lock loses it with its connection.
func (s *Store) withLock(ctx context.Context, key advisory.Key, f func() error) (ran bool, err error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return false, fmt.Errorf("acquire a connection: %w", err)
	}
	defer conn.Release()
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, int64(key)).Scan(&ran); err != nil {
		return false, fmt.Errorf("advisory lock: %w", err)
	}
	if !ran {
		return false, nil
	}
	defer func() {
		if _, err := conn.Exec(context.Background(), `SELECT pg_advisory_unlock($1)`, int64(key)); err != nil {
			conn.Conn().Close(context.Background()) // the lock goes with the session
		}
	}()
	return true, f()
}

// deviceExists reports whether id is a registered device.
func (s *Store) deviceExists(ctx context.Context, id string) error {
	var ok bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM devices WHERE id = $1)`, id).Scan(&ok); err != nil {
		return fmt.Errorf("look up device %s: %w", id, err)
	}
	if !ok {
		return fmt.Errorf("device %s: %w", id, fleet.ErrNotFound)
	}
	return nil
}
