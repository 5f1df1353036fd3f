package command

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/fleetd/fleetd/internal/advisory"
)

// Bulk commands live in command_bulks and command_bulk_targets (migration
// 00017); each device's command is a row of commands with bulk_id set,
// whose state changes keep the bulk's counters (triggers of 00017).

const bulkColumns = `id, name, params, timeout_ms, expires_in_ms, selector, max_concurrent, devices_per_minute, state, total,
	next_position, paced_until, pending, queued, delivered, succeeded, failed, timed_out, expired, skipped, cancelled,
	created_at, finished_at, updated_at`

func scanBulk(row pgx.Row) (Bulk, error) {
	var b Bulk
	var timeoutMS, expiresMS int64
	var sel []byte
	var paced *time.Time
	c := &b.Counts
	err := row.Scan(&b.ID, &b.Name, &b.Params, &timeoutMS, &expiresMS, &sel, &b.Pacing.MaxConcurrent, &b.Pacing.DevicesPerMinute,
		&b.State, &b.Total, &b.Next, &paced, &c.Pending, &c.Queued, &c.Delivered, &c.Succeeded, &c.Failed, &c.TimedOut,
		&c.Expired, &c.Skipped, &c.Cancelled, &b.CreatedAt, &b.FinishedAt, &b.UpdatedAt)
	if err != nil {
		return b, err
	}
	b.Timeout = Duration(time.Duration(timeoutMS) * time.Millisecond)
	b.ExpiresIn = Duration(time.Duration(expiresMS) * time.Millisecond)
	if paced != nil {
		b.PacedUntil = *paced
	}
	return b, json.Unmarshal(sel, &b.Selector)
}

func newBulkID() string { return "bulk_" + newID()[len("cmd_"):] }

// CreateBulk stores a running bulk for the devices given (selected, in id
// order), unless maxRunning bulks are running already (ErrTooManyBulks).
// Creations are serialised by a transaction advisory lock
// (advisory.CommandBulks) so that two cannot pass the cap together.
func (s *Store) CreateBulk(ctx context.Context, r BulkRequest, devices []string, maxRunning int, now time.Time) (Bulk, error) {
	var b Bulk
	now = now.UTC().Truncate(time.Microsecond)
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(advisory.CommandBulks)); err != nil {
			return err
		}
		var running int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM command_bulks WHERE state = 'running'`).Scan(&running); err != nil {
			return err
		}
		if running >= maxRunning {
			return fmt.Errorf("%d bulk commands are running (at most %d; cancel one or wait): %w", running, maxRunning, ErrTooManyBulks)
		}
		sel, _ := json.Marshal(r.Selector)
		var err error
		b, err = scanBulk(tx.QueryRow(ctx, `INSERT INTO command_bulks (id, name, params, timeout_ms, expires_in_ms, selector,
				max_concurrent, devices_per_minute, total, pending, created_at, updated_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $10) RETURNING `+bulkColumns,
			newBulkID(), r.Name, r.Params, r.Timeout.D().Milliseconds(), r.ExpiresIn.D().Milliseconds(), sel,
			r.Pacing.MaxConcurrent, r.Pacing.DevicesPerMinute, len(devices), now))
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `INSERT INTO command_bulk_targets (bulk_id, position, device_id)
			SELECT $1, n - 1, d FROM unnest($2::text[]) WITH ORDINALITY AS x(d, n)`, b.ID, devices)
		return err
	})
	if err != nil {
		return Bulk{}, fmt.Errorf("create bulk command: %w", err)
	}
	return b, nil
}

// GetBulk returns a bulk, or an error wrapping ErrNotFound.
func (s *Store) GetBulk(ctx context.Context, id string) (Bulk, error) {
	b, err := scanBulk(s.pool.QueryRow(ctx, `SELECT `+bulkColumns+` FROM command_bulks WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return b, fmt.Errorf("bulk command %s: %w", id, ErrNotFound)
	}
	return b, err
}

// ListBulks returns bulks newest first, after the cursor.
func (s *Store) ListBulks(ctx context.Context, after *Cursor, limit int) ([]Bulk, error) {
	var rows pgx.Rows
	var err error
	if after == nil {
		rows, err = s.pool.Query(ctx, `SELECT `+bulkColumns+` FROM command_bulks ORDER BY created_at DESC, id DESC LIMIT $1`, limit)
	} else {
		rows, err = s.pool.Query(ctx, `SELECT `+bulkColumns+` FROM command_bulks WHERE (created_at, id) < ($1, $2)
			ORDER BY created_at DESC, id DESC LIMIT $3`, after.At, after.ID, limit)
	}
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Bulk, error) { return scanBulk(r) })
}

// targetState is a target's state: its command's, or why it has none.
const targetState = `CASE WHEN t.command_id IS NOT NULL THEN coalesce(c.state, 'pruned')
	WHEN t.skipped IS NOT NULL THEN 'skipped' WHEN b.state = 'cancelled' THEN 'cancelled' ELSE 'pending' END`

// Targets returns a bulk's devices in order after position after (-1 for
// the first page), only those in state when it is not empty. It returns an
// error wrapping ErrNotFound for an unknown bulk.
func (s *Store) Targets(ctx context.Context, id, state string, after, limit int) ([]BulkTarget, error) {
	var exists bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM command_bulks WHERE id = $1)`, id).Scan(&exists); err != nil {
		return nil, err
	}
	if !exists {
		return nil, fmt.Errorf("bulk command %s: %w", id, ErrNotFound)
	}
	rows, err := s.pool.Query(ctx, `SELECT t.position, t.device_id, coalesce(t.command_id, ''), coalesce(t.skipped, ''), `+targetState+`,
			c.result, c.created_at, c.delivered_at, c.finished_at
		FROM command_bulk_targets t JOIN command_bulks b ON b.id = t.bulk_id LEFT JOIN commands c ON c.id = t.command_id
		WHERE t.bulk_id = $1 AND t.position > $2 AND ($3 = '' OR `+targetState+` = $3)
		ORDER BY t.position LIMIT $4`, id, after, state, limit)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (BulkTarget, error) {
		var t BulkTarget
		var result []byte
		err := r.Scan(&t.Position, &t.DeviceID, &t.CommandID, &t.Skipped, &t.State, &result, &t.SentAt, &t.DeliveredAt, &t.FinishedAt)
		if len(result) > 0 {
			t.Result = result
		}
		return t, err
	})
}

// StepBulk claims the first running bulk whose id is above after (FOR NO
// KEY UPDATE SKIP LOCKED: a bulk another replica is stepping is skipped,
// so replicas step bulks together without sending anything twice), asks
// its Decide what to do at now() (read once the bulk is locked, so that
// every command it counts as finished finished before) and does it: it
// creates the batch's commands (queued; the caller delivers them after the
// commit), or marks the bulk completed. Targets that are no longer active
// devices, or have maxPending pending commands, are skipped. found is false
// when no running bulk is left above after.
func (s *Store) StepBulk(ctx context.Context, after string, maxPending int, now func() time.Time) (b Bulk, sent []Command, found bool, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		sent = nil
		var err error
		b, err = scanBulk(tx.QueryRow(ctx, `SELECT `+bulkColumns+` FROM command_bulks WHERE state = 'running' AND id > $1
			ORDER BY id LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED`, after))
		if errors.Is(err, pgx.ErrNoRows) {
			found = false
			return nil
		}
		if err != nil {
			return err
		}
		found = true
		t := now().UTC().Truncate(time.Microsecond)
		d := b.Decide(t)
		if d.Complete {
			b, err = scanBulk(tx.QueryRow(ctx, `UPDATE command_bulks SET state = 'completed', finished_at = $2, updated_at = $2
				WHERE id = $1 RETURNING `+bulkColumns, b.ID, t))
			return err
		}
		if d.Send <= 0 {
			return nil
		}
		scan := min(d.Send, b.Total-b.Next)
		rows, err := tx.Query(ctx, `SELECT t.position, t.device_id, d.state,
				(SELECT count(*) FROM commands c WHERE c.device_id = t.device_id AND c.state = ANY($4))
			FROM command_bulk_targets t JOIN devices d ON d.id = t.device_id
			WHERE t.bulk_id = $1 AND t.position >= $2 AND t.position < $2 + $3
			ORDER BY t.position FOR NO KEY UPDATE OF d`, b.ID, b.Next, scan, pendingStates)
		if err != nil {
			return err
		}
		type target struct {
			pos            int
			device, state  string
			pendingCommand int
		}
		ts, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (target, error) {
			var x target
			return x, r.Scan(&x.pos, &x.device, &x.state, &x.pendingCommand)
		})
		if err != nil {
			return err
		}
		present := map[int]target{}
		for _, x := range ts {
			present[x.pos] = x
		}
		var ids, devices, reasons []string
		var sentPos, skipPos []int32
		for p := b.Next; p < b.Next+scan; p++ {
			x, ok := present[p]
			switch {
			case !ok:
				skipPos, reasons = append(skipPos, int32(p)), append(reasons, "device deleted")
			case x.state != "active":
				skipPos, reasons = append(skipPos, int32(p)), append(reasons, "device "+x.state)
			case x.pendingCommand >= maxPending:
				skipPos, reasons = append(skipPos, int32(p)), append(reasons, fmt.Sprintf("device had %d pending commands (at most %d)", x.pendingCommand, maxPending))
			default:
				ids, devices, sentPos = append(ids, newID()), append(devices, x.device), append(sentPos, int32(p))
			}
		}
		if len(ids) > 0 {
			rows, err := tx.Query(ctx, `INSERT INTO commands (id, device_id, name, params, timeout_ms, created_at, expires_at, updated_at, bulk_id)
				SELECT i, d, $3, $4, $5, $6, $7, $6, $8 FROM unnest($1::text[], $2::text[]) AS x(i, d) RETURNING `+columns,
				ids, devices, b.Name, b.Params, b.Timeout.D().Milliseconds(), t, t.Add(b.ExpiresIn.D()), b.ID)
			if sent, err = collect(rows, err); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE command_bulk_targets t SET command_id = x.c FROM unnest($2::int[], $3::text[]) AS x(p, c)
				WHERE t.bulk_id = $1 AND t.position = x.p`, b.ID, sentPos, ids); err != nil {
				return err
			}
		}
		if len(skipPos) > 0 {
			if _, err := tx.Exec(ctx, `UPDATE command_bulk_targets t SET skipped = x.r FROM unnest($2::int[], $3::text[]) AS x(p, r)
				WHERE t.bulk_id = $1 AND t.position = x.p`, b.ID, skipPos, reasons); err != nil {
				return err
			}
		}
		var paced *time.Time
		if !d.PacedUntil.IsZero() {
			paced = &d.PacedUntil
		}
		b, err = scanBulk(tx.QueryRow(ctx, `UPDATE command_bulks SET next_position = next_position + $2, pending = pending - $2,
				skipped = skipped + $3, paced_until = $4, updated_at = $5
			WHERE id = $1 RETURNING `+bulkColumns, b.ID, scan, len(skipPos), paced, t))
		return err
	})
	if err != nil {
		return b, nil, found, fmt.Errorf("step bulk command: %w", err)
	}
	return b, sent, found, nil
}

// CancelBulk stops a running bulk: its devices not sent yet count as
// cancelled, and its commands still queued (not handed to a session) expire
// now. Delivered ones are left to be answered or to time out. It returns
// the bulk and the commands it expired, an error wrapping ErrNotFound for
// an unknown bulk and ErrFinished for one that is not running.
//
// The bulk is marked first, in its own statement: a pacer stepping it
// finishes first, and none sends anything after. The queued commands are
// expired after, in the order every settle takes its locks (command, then
// bulk), so that cancelling cannot deadlock with answers arriving.
func (s *Store) CancelBulk(ctx context.Context, id string, now time.Time) (Bulk, []Command, error) {
	now = now.UTC().Truncate(time.Microsecond)
	_, err := scanBulk(s.pool.QueryRow(ctx, `UPDATE command_bulks SET state = 'cancelled', cancelled = cancelled + pending, pending = 0,
			finished_at = $2, updated_at = $2
		WHERE id = $1 AND state = 'running' RETURNING `+bulkColumns, id, now))
	if errors.Is(err, pgx.ErrNoRows) {
		b, err := s.GetBulk(ctx, id)
		if err != nil {
			return b, nil, err
		}
		return b, nil, fmt.Errorf("bulk command %s is %s: %w", id, b.State, ErrFinished)
	}
	if err != nil {
		return Bulk{}, nil, fmt.Errorf("cancel bulk command %s: %w", id, err)
	}
	expired, err := collect(s.pool.Query(ctx, `UPDATE commands SET state = 'expired', finished_at = $2, updated_at = $2
		WHERE bulk_id = $1 AND state = 'queued' RETURNING `+columns, id, now))
	if err != nil {
		return Bulk{}, nil, fmt.Errorf("expire the queued commands of bulk %s: %w", id, err)
	}
	b, err := s.GetBulk(ctx, id)
	return b, expired, err
}

// pruneBulks deletes finished bulks (and their targets) older than
// retention, a few at a time: a bulk holds up to the per-bulk cap of
// targets.
func pruneBulks(ctx context.Context, tx pgx.Tx, before time.Time) (int64, error) {
	tag, err := tx.Exec(ctx, `DELETE FROM command_bulks WHERE id IN (SELECT id FROM command_bulks
		WHERE finished_at IS NOT NULL AND finished_at < $1 AND state <> 'running' LIMIT 10)`, before)
	return tag.RowsAffected(), err
}
