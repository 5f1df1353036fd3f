package command

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/advisory"
)

// Store keeps commands in PostgreSQL (table commands, migration 00015).
type Store struct {
	pool *pgxpool.Pool
}

// NewStore returns the store on pool.
func NewStore(pool *pgxpool.Pool) *Store { return &Store{pool: pool} }

const columns = `id, device_id, name, params, state, result, timeout_ms, created_at, expires_at, delivered_at, finished_at, updated_at, coalesce(bulk_id, '')`

func scan(row pgx.Row) (Command, error) {
	var c Command
	var timeoutMS int64
	var result []byte
	err := row.Scan(&c.ID, &c.DeviceID, &c.Name, &c.Params, &c.State, &result, &timeoutMS, &c.CreatedAt, &c.ExpiresAt,
		&c.DeliveredAt, &c.FinishedAt, &c.UpdatedAt, &c.BulkID)
	c.Timeout = Duration(time.Duration(timeoutMS) * time.Millisecond)
	if len(result) > 0 {
		c.Result = result
	}
	return c, err
}

func collect(rows pgx.Rows, err error) ([]Command, error) {
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Command, error) { return scan(r) })
}

// newID returns a fresh command id: "cmd_" and 128 random bits in hex.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return "cmd_" + hex.EncodeToString(b[:])
}

// Create stores a queued command for an active device, unless it has
// maxPending pending ones already. It returns an error wrapping
// fleet.ErrNotFound for an unknown device, ErrGone for a decommissioned one
// and ErrTooMany past the cap. The device's row is locked (FOR NO KEY
// UPDATE, which only other writers of the row wait for) so that concurrent
// requests cannot pass the cap together.
func (s *Store) Create(ctx context.Context, deviceID string, r Request, maxPending int, now time.Time) (Command, error) {
	var c Command
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var state string
		err := tx.QueryRow(ctx, `SELECT state FROM devices WHERE id = $1 FOR NO KEY UPDATE`, deviceID).Scan(&state)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("device %s: %w", deviceID, fleet.ErrNotFound)
		}
		if err != nil {
			return err
		}
		if state != fleet.StateActive {
			return fmt.Errorf("device %s: %w", deviceID, ErrGone)
		}
		var pending int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM commands WHERE device_id = $1 AND state = ANY($2)`,
			deviceID, pendingStates).Scan(&pending); err != nil {
			return err
		}
		if pending >= maxPending {
			return fmt.Errorf("device %s has %d pending commands (at most %d; they finish when answered, timed out or expired): %w",
				deviceID, pending, maxPending, ErrTooMany)
		}
		now = now.UTC().Truncate(time.Microsecond)
		c, err = scan(tx.QueryRow(ctx, `INSERT INTO commands (id, device_id, name, params, timeout_ms, created_at, expires_at, updated_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $6) RETURNING `+columns,
			newID(), deviceID, r.Name, r.Params, r.Timeout.D().Milliseconds(), now, now.Add(r.ExpiresIn.D())))
		return err
	})
	return c, err
}

// Get returns a device's command, or an error wrapping ErrNotFound.
func (s *Store) Get(ctx context.Context, deviceID, id string) (Command, error) {
	c, err := scan(s.pool.QueryRow(ctx, `SELECT `+columns+` FROM commands WHERE id = $1 AND device_id = $2`, id, deviceID))
	if errors.Is(err, pgx.ErrNoRows) {
		return c, fmt.Errorf("command %s of device %s: %w", id, deviceID, ErrNotFound)
	}
	return c, err
}

// lookup returns a command by id whatever its device; found is false for
// an unknown id.
func (s *Store) lookup(ctx context.Context, id string) (c Command, found bool, err error) {
	c, err = scan(s.pool.QueryRow(ctx, `SELECT `+columns+` FROM commands WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return c, false, nil
	}
	return c, err == nil, err
}

// Cursor is where a listing page ends: the last command's creation time and id.
type Cursor struct {
	At time.Time
	ID string
}

// List returns a device's commands, newest first, after the cursor.
func (s *Store) List(ctx context.Context, deviceID string, after *Cursor, limit int) ([]Command, error) {
	if after == nil {
		return collect(s.pool.Query(ctx, `SELECT `+columns+` FROM commands WHERE device_id = $1
			ORDER BY created_at DESC, id DESC LIMIT $2`, deviceID, limit))
	}
	return collect(s.pool.Query(ctx, `SELECT `+columns+` FROM commands WHERE device_id = $1 AND (created_at, id) < ($2, $3)
		ORDER BY created_at DESC, id DESC LIMIT $4`, deviceID, after.At, after.ID, limit))
}

// Deliverable returns the device's commands that a session that subscribed
// now should get: queued, or delivered without an answer (handing a message
// to a session is not receiving it), neither expired nor past their deadline.
func (s *Store) Deliverable(ctx context.Context, deviceID string, now time.Time) ([]Command, error) {
	return collect(s.pool.Query(ctx, `SELECT `+columns+` FROM commands WHERE device_id = $1 AND state = ANY($2)
		AND expires_at > $3 AND (deadline_at IS NULL OR deadline_at > $3) ORDER BY created_at, id`, deviceID, pendingStates, now))
}

// MarkDelivered moves a queued command to delivered, with its deadline. It
// reports whether it did (the command may have been answered, or delivered
// by another replica, meanwhile).
func (s *Store) MarkDelivered(ctx context.Context, id string, now time.Time) (Command, bool, error) {
	c, err := scan(s.pool.QueryRow(ctx, `UPDATE commands SET state = 'delivered', delivered_at = $2,
			deadline_at = $2 + timeout_ms * interval '1 millisecond', updated_at = $2
		WHERE id = $1 AND state = 'queued' AND expires_at > $2 RETURNING `+columns, id, now))
	if errors.Is(err, pgx.ErrNoRows) {
		return c, false, nil
	}
	return c, err == nil, err
}

// Settle records a device's answer to its own pending command. found is
// false when no pending command of this device has the id; the caller then
// looks up why.
func (s *Store) Settle(ctx context.Context, deviceID string, r Response, now time.Time) (Command, bool, error) {
	c, err := scan(s.pool.QueryRow(ctx, `UPDATE commands SET state = $3, result = $4, finished_at = $5, updated_at = $5,
			delivered_at = coalesce(delivered_at, $5)
		WHERE id = $1 AND device_id = $2 AND state = ANY($6) RETURNING `+columns,
		r.ID, deviceID, r.Status, nullable(r.Result), now, pendingStates))
	if errors.Is(err, pgx.ErrNoRows) {
		return c, false, nil
	}
	return c, err == nil, err
}

func nullable(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return b
}

// sweepBatch bounds the commands one statement of the sweep settles.
const sweepBatch = 1000

// Expire settles queued commands past their expiry as expired, and
// delivered ones past their deadline as timed_out, and returns them. Rows
// another replica is settling are skipped (SKIP LOCKED), so replicas
// sweeping together neither wait for each other nor settle a command twice.
func (s *Store) Expire(ctx context.Context, now time.Time) ([]Command, error) {
	expired, err := collect(s.pool.Query(ctx, `UPDATE commands SET state = 'expired', finished_at = $1, updated_at = $1
		WHERE id IN (SELECT id FROM commands WHERE state = 'queued' AND expires_at <= $1
			ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
		RETURNING `+columns, now, sweepBatch))
	if err != nil {
		return nil, fmt.Errorf("expire queued commands: %w", err)
	}
	timedOut, err := collect(s.pool.Query(ctx, `UPDATE commands SET state = 'timed_out', finished_at = $1, updated_at = $1
		WHERE id IN (SELECT id FROM commands WHERE state = 'delivered' AND deadline_at <= $1
			ORDER BY deadline_at LIMIT $2 FOR UPDATE SKIP LOCKED)
		RETURNING `+columns, now, sweepBatch))
	if err != nil {
		return expired, fmt.Errorf("time out delivered commands: %w", err)
	}
	return append(expired, timedOut...), nil
}

// Prune deletes finished commands older than retention, and those past the
// newest keep finished ones of their device, and finished bulk commands
// older than retention (their summaries are counters, true however many of
// their commands were pruned before). One replica prunes at a time
// (advisory.CommandRetention); the others skip the round. It returns how
// many rows it deleted.
func (s *Store) Prune(ctx context.Context, now time.Time, retention time.Duration, keep int) (int64, error) {
	var n int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var got bool
		if err := tx.QueryRow(ctx, `SELECT pg_try_advisory_xact_lock($1)`, int64(advisory.CommandRetention)).Scan(&got); err != nil || !got {
			return err
		}
		tag, err := tx.Exec(ctx, `DELETE FROM commands WHERE id IN (SELECT id FROM commands
			WHERE finished_at IS NOT NULL AND finished_at < $1 LIMIT 10000)`, now.Add(-retention))
		if err != nil {
			return err
		}
		n = tag.RowsAffected()
		tag, err = tx.Exec(ctx, `DELETE FROM commands WHERE id IN (
			SELECT id FROM (SELECT id, finished_at, row_number() OVER (PARTITION BY device_id ORDER BY created_at DESC, id DESC) AS n
				FROM commands WHERE finished_at IS NOT NULL) ranked
			WHERE n > $1 LIMIT 10000)`, keep)
		n += tag.RowsAffected()
		if err != nil {
			return err
		}
		bulks, err := pruneBulks(ctx, tx, now.Add(-retention))
		n += bulks
		return err
	})
	return n, err
}
