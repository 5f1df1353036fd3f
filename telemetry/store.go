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

// Store is telemetry's PostgreSQL storage: the batch write, the rollup job's
// statements, the queries of the API, and the partitions and deletes of
// retention.
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

// Batches are written in one of two ways (writeBatch):
//
//   - the common case, every message new and of a minute not yet sealed
//     for the rollup: one COPY straight into telemetry_raw, one row per
//     message, so that a message costs one heap row and one index entry;
//   - a batch holding rows that may be stored already (a retry after a lost
//     commit: the COPY failed on the key) or rows of a sealed minute (late,
//     after an outage): the rows are copied into a temporary table and
//     inserted from it, skipping the stored ones, and the late ones that were
//     inserted are added to the rollups in the same statement (addSQL), since
//     the rollup job has passed their minute.
//
// Either way the transaction holds advisory.TelemetrySeal shared from before
// it reads the seal until it commits, so the rollup job, which moves the seal
// under the exclusive lock, sees every row of a sealed minute either as
// committed before the seal or marked late — never neither, never both.
const rawColumns = "device_id, at, names, vals, bssid, ssid, band, channel"

// beginBatchSQL starts a batch transaction: no wait for the WAL flush
// (telemetry is not spooled either, see Writer: a commit lost to a database
// crash costs what the queue would lose) and the seal lock, shared.
var beginBatchSQL = fmt.Sprintf(`SET LOCAL synchronous_commit = off; SELECT pg_advisory_xact_lock_shared(%d)`, int64(advisory.TelemetrySeal))

// insertCheckedSQL inserts the copied rows that are not stored yet, marks
// those of sealed minutes ($1) late and adds the late ones to the rollups.
var insertCheckedSQL = `WITH ins AS (
	INSERT INTO telemetry_raw (` + rawColumns + `, late)
	SELECT ` + rawColumns + `, at < $1 FROM telemetry_in
	ON CONFLICT DO NOTHING
	RETURNING ` + rawColumns + `, late
), src AS (SELECT * FROM ins WHERE late), ` + addSQL("src")

// writeBatch stores a batch in one transaction (see rawColumns). Writing the
// same batch twice stores it once; a row of a minute already rolled up is
// added to the rollups once, by the write that stores it.
func (s *Store) writeBatch(ctx context.Context, batch []Entry) error {
	err := s.writeRaw(ctx, batch, false)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" {
		// Some of the batch is stored already: its earlier write
		// committed but the writer did not hear so.
		err = s.writeRaw(ctx, batch, true)
	}
	return err
}

// writeRaw is one attempt of writeBatch; checked takes the slower way for
// every row (see rawColumns).
func (s *Store) writeRaw(ctx context.Context, batch []Entry, checked bool) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, beginBatchSQL); err != nil {
			return fmt.Errorf("begin telemetry batch: %w", err)
		}
		var sealed time.Time
		if err := tx.QueryRow(ctx, `SELECT sealed_to FROM telemetry_rollup_state`).Scan(&sealed); err != nil {
			return fmt.Errorf("read the telemetry seal: %w", err)
		}
		split := checked
		for i := 0; i < len(batch) && !split; i++ {
			split = batch[i].At.Before(sealed)
		}
		fast, slow := batch, []Entry(nil) // the common case: no copy of the batch
		if split {
			fast = nil
			for i := range batch {
				if checked || batch[i].At.Before(sealed) {
					slow = append(slow, batch[i])
				} else {
					fast = append(fast, batch[i])
				}
			}
		}
		if len(fast) > 0 {
			if err := copyRaw(ctx, tx, "telemetry_raw", fast); err != nil {
				return err
			}
		}
		if len(slow) == 0 {
			return nil
		}
		if _, err := tx.Exec(ctx, `CREATE TEMP TABLE IF NOT EXISTS telemetry_in (LIKE telemetry_raw INCLUDING DEFAULTS) ON COMMIT DELETE ROWS`); err != nil {
			return fmt.Errorf("prepare telemetry copy: %w", err)
		}
		if err := copyRaw(ctx, tx, "telemetry_in", slow); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, insertCheckedSQL, sealed); err != nil {
			return fmt.Errorf("insert telemetry: %w", err)
		}
		return nil
	})
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

// partitionName is the partition of telemetry_raw holding the UTC day of t.
func partitionName(t time.Time) string {
	return "telemetry_raw_p" + t.UTC().Format("20060102")
}

// partitionDay parses a partition's name back to its day.
func partitionDay(name string) (time.Time, bool) {
	day, ok := strings.CutPrefix(name, "telemetry_raw_p")
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
				plan = append(plan, ddl{name, "create", fmt.Sprintf(`CREATE TABLE %s PARTITION OF telemetry_raw FOR VALUES FROM ('%s') TO ('%s')`,
					name, day.Format(time.RFC3339), day.Add(24*time.Hour).Format(time.RFC3339))})
			}
		}
		return plan
	})
}

// dropPartitions drops the partitions whose whole day ended before cutoff
// and returns their names, except those whose day ended after rolled (the
// rollup watermark: their rows are not all rolled up), which it returns as
// kept.
func (s *Store) dropPartitions(ctx context.Context, cutoff, rolled time.Time) (dropped, kept []string, err error) {
	dropped, err = s.alterPartitions(ctx, func(existing []string) (plan []ddl) {
		kept = kept[:0]
		for _, name := range existing {
			day, ok := partitionDay(name)
			switch {
			case !ok || day.Add(24*time.Hour).After(cutoff):
			case day.Add(24 * time.Hour).After(rolled):
				kept = append(kept, name)
			default:
				plan = append(plan, ddl{name, "drop", "DROP TABLE " + pgx.Identifier{name}.Sanitize()})
			}
		}
		return plan
	})
	return dropped, kept, err
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
		WHERE i.inhparent = 'telemetry_raw'::regclass ORDER BY 1`)
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
