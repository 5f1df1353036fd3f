package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/fleetd/fleetd/internal/advisory"
)

// Connection events are kept in one partition of device_events per UTC day
// (migrations/00012_events_partitioned.sql). The maintenance loop creates the
// partitions of the coming days ahead and drops those entirely older than
// the retention, a DROP TABLE of each day instead of a DELETE of its rows;
// it also prunes the rollups, which are kept longer.

// EventRetention says how long connection events and their rollups are kept,
// and how many days of partitions are created ahead. Zero fields take the
// defaults.
type EventRetention struct {
	// Events is how long events are kept: a day's partition is dropped once
	// all of it is older than this. Default 30 days.
	Events time.Duration
	// MinuteRollups is how long the per-minute rollups are kept (fleet
	// health, fleet history by minute, learned verdicts). Default 90 days.
	MinuteRollups time.Duration
	// HourlyRollups is how long the hourly rollups are kept (fleet history
	// by hour and day). Default 365 days.
	HourlyRollups time.Duration
	// DaysAhead is how many days after today have a partition. Default 7.
	DaysAhead int
}

// DefaultEventRetention returns the production retention.
func DefaultEventRetention() EventRetention {
	return EventRetention{Events: 30 * 24 * time.Hour, MinuteRollups: 90 * 24 * time.Hour, HourlyRollups: 365 * 24 * time.Hour, DaysAhead: 7}
}

func (r EventRetention) withDefaults() EventRetention {
	d := DefaultEventRetention()
	if r.Events <= 0 {
		r.Events = d.Events
	}
	if r.MinuteRollups <= 0 {
		r.MinuteRollups = d.MinuteRollups
	}
	if r.HourlyRollups <= 0 {
		r.HourlyRollups = d.HourlyRollups
	}
	if r.DaysAhead <= 0 {
		r.DaysAhead = d.DaysAhead
	}
	return r
}

// EventMaintenance is what one maintenance pass did.
type EventMaintenance struct {
	// Skipped: another replica holds the maintenance lock and does the pass.
	Skipped bool
	// Created and Dropped name the partitions created and dropped.
	Created, Dropped []string
	// Pruned counts the rollup and session rows deleted past their retention.
	Pruned int64
}

// eventMaintenanceInterval is how often the loop runs: partitions exist a
// week ahead, so an hour is plenty; a failed pass is retried sooner.
const (
	eventMaintenanceInterval = time.Hour
	eventMaintenanceRetry    = 5 * time.Minute
)

// RunEventMaintenance runs MaintainEvents now and then every hour until ctx
// ends. With several replicas, one of them does each pass.
func (s *Service) RunEventMaintenance(ctx context.Context, r EventRetention) {
	for {
		wait := eventMaintenanceInterval
		m, err := s.MaintainEvents(ctx, r)
		switch {
		case err != nil && ctx.Err() == nil:
			s.logger.Warn("event maintenance failed; retrying", "err", err, "retry_in", eventMaintenanceRetry.String())
			wait = eventMaintenanceRetry
		case len(m.Created) > 0 || len(m.Dropped) > 0 || m.Pruned > 0:
			s.logger.Info("event maintenance", "created", m.Created, "dropped", m.Dropped, "rollup_rows_pruned", m.Pruned)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// MaintainEvents makes one maintenance pass at the service's clock: it
// creates the partitions of today and the r.DaysAhead days after, drops the
// partitions entirely older than r.Events, and deletes rollup rows past
// their retention (and open sessions that started before r.Events and are
// not their device's live session: their disconnect was lost). It does
// nothing (Skipped) when another replica is making a pass.
func (s *Service) MaintainEvents(ctx context.Context, r EventRetention) (EventMaintenance, error) {
	return s.store.maintainEvents(ctx, s.now(), r.withDefaults())
}

// eventMaintenanceLock is the advisory lock of a maintenance pass, so that
// one replica makes it; partitionLock serialises every partition DDL (the
// pass's and the writers' on demand) across replicas.
const (
	eventMaintenanceLock = advisory.EventMaintenance
	partitionLock        = advisory.EventPartitions
)

// partitionLockTimeout bounds how long partition DDL waits for its table
// lock: a DROP TABLE of a partition locks device_events whole, and waiting in
// the lock queue would stall every query behind it.
const partitionLockTimeout = "5s"

func (s *Store) maintainEvents(ctx context.Context, now time.Time, r EventRetention) (EventMaintenance, error) {
	var m EventMaintenance
	release, ok, err := s.tryAdvisoryLock(ctx, eventMaintenanceLock)
	if err != nil {
		return m, err
	}
	if !ok {
		m.Skipped = true
		return m, nil
	}
	defer release()
	today := utcDay(now)
	days := make([]time.Time, 0, r.DaysAhead+1)
	for i := range r.DaysAhead + 1 {
		days = append(days, today.AddDate(0, 0, i))
	}
	if m.Created, err = s.createPartitions(ctx, "device_events", days); err != nil {
		return m, err
	}
	parts, err := s.partitions(ctx, "device_events")
	if err != nil {
		return m, err
	}
	cutoff := now.Add(-r.Events)
	for _, p := range parts {
		if p.day.AddDate(0, 0, 1).After(cutoff) {
			continue
		}
		if err := s.dropPartition(ctx, p.name); err != nil {
			return m, err
		}
		m.Dropped = append(m.Dropped, p.name)
	}
	for _, q := range []struct {
		sql    string
		cutoff time.Time
	}{
		{`DELETE FROM event_rollups_minute WHERE minute < $1`, now.Add(-r.MinuteRollups)},
		{`DELETE FROM session_rollups_minute WHERE minute < $1`, now.Add(-r.MinuteRollups)},
		{`DELETE FROM event_rollups_hour WHERE hour < $1`, now.Add(-r.HourlyRollups)},
		{`DELETE FROM fleet_counts_minute WHERE minute < $1`, now.Add(-r.MinuteRollups)},
		{`DELETE FROM fleet_counts_hour WHERE hour < $1`, now.Add(-r.HourlyRollups)},
		{`DELETE FROM history_minute WHERE minute < $1`, now.Add(-r.MinuteRollups)},
		{`DELETE FROM history_hour WHERE hour < $1`, now.Add(-r.HourlyRollups)},
		{`DELETE FROM link_rollups_hour WHERE hour < $1`, now.Add(-r.MinuteRollups)},
		// Open sessions whose device shows another session (their disconnect
		// was never stored) stop counting as open; then the devices that
		// neither ended a session since the cutoff nor have one open go.
		// The first locks session_devices in key order, like the writer.
		{`WITH gone AS (
			DELETE FROM sessions_open o WHERE started_at < $1 AND NOT EXISTS (
				SELECT 1 FROM devices d WHERE d.id = o.device_id AND d.online AND d.session_epoch = o.session_epoch)
			RETURNING model, firmware, device_id)
		INSERT INTO session_devices AS s (model, firmware, device_id, last_end, open_sessions)
		SELECT model, firmware, device_id, '-infinity', -count(*) FROM gone
		GROUP BY model, firmware, device_id ORDER BY model, firmware, device_id
		ON CONFLICT (model, firmware, device_id) DO UPDATE SET open_sessions = s.open_sessions + EXCLUDED.open_sessions`, cutoff},
		{`DELETE FROM session_devices WHERE last_end < $1 AND open_sessions <= 0`, now.Add(-r.MinuteRollups)},
	} {
		tag, err := s.pool.Exec(ctx, q.sql, q.cutoff)
		if err != nil {
			return m, fmt.Errorf("prune rollups: %w", err)
		}
		m.Pruned += tag.RowsAffected()
	}
	return m, nil
}

// partition is one day's partition of a table.
type partition struct {
	name string
	day  time.Time
}

func partitionName(table string, day time.Time) string { return table + "_p" + day.Format("20060102") }

// partitions lists the day partitions of a table, oldest first. Partitions
// not named by partitionName (an operator's own) are left out, so never dropped.
func (s *Store) partitions(ctx context.Context, table string) ([]partition, error) {
	rows, err := s.pool.Query(ctx, `SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		WHERE i.inhparent = $1::text::regclass`, table)
	if err != nil {
		return nil, fmt.Errorf("list partitions of %s: %w", table, err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list partitions of %s: %w", table, err)
	}
	var out []partition
	for _, n := range names {
		suffix, ok := strings.CutPrefix(n, table+"_p")
		if !ok || len(suffix) != 8 {
			continue
		}
		day, err := time.Parse("20060102", suffix)
		if err != nil {
			continue
		}
		out = append(out, partition{name: n, day: day})
	}
	slices.SortFunc(out, func(a, b partition) int { return a.day.Compare(b.day) })
	return out, nil
}

// createEventPartitions creates the partitions of device_events for the
// given days that have none (writeEvents, for a batch that found one missing).
func (s *Store) createEventPartitions(ctx context.Context, days []time.Time) error {
	_, err := s.createPartitions(ctx, "device_events", days)
	return err
}

// createPartitions creates the missing day partitions of a table, one
// transaction each, and returns the names of those it created. A partition
// is created as a table of its own and then attached: CREATE TABLE …
// PARTITION OF would lock the whole table, ATTACH PARTITION lets reads and
// writes go on.
func (s *Store) createPartitions(ctx context.Context, table string, days []time.Time) ([]string, error) {
	var created []string
	for _, day := range days {
		name := partitionName(table, day)
		ok, err := s.createPartition(ctx, table, name, day)
		if err != nil {
			return created, fmt.Errorf("create partition %s: %w", name, err)
		}
		if ok {
			created = append(created, name)
		}
	}
	return created, nil
}

func (s *Store) createPartition(ctx context.Context, table, name string, day time.Time) (created bool, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(partitionLock)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '`+partitionLockTimeout+`'`); err != nil {
			return err
		}
		var attached bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
			WHERE i.inhparent = $1::text::regclass AND c.relname = $2)`, table, name).Scan(&attached); err != nil {
			return err
		}
		if attached {
			return nil
		}
		t, p := pgx.Identifier{table}.Sanitize(), pgx.Identifier{name}.Sanitize()
		from, to := day.Format("2006-01-02")+" 00:00:00+00", day.AddDate(0, 0, 1).Format("2006-01-02")+" 00:00:00+00"
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+p+` (LIKE `+t+` INCLUDING DEFAULTS INCLUDING CONSTRAINTS)`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `ALTER TABLE `+t+` ATTACH PARTITION `+p+` FOR VALUES FROM ('`+from+`') TO ('`+to+`')`); err != nil {
			return err
		}
		created = true
		return nil
	})
	return created, err
}

// dropPartition drops a partition with its rows, in one short lock of the
// table (partitionLockTimeout; a pass that cannot get it retries later).
func (s *Store) dropPartition(ctx context.Context, name string) error {
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(partitionLock)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '`+partitionLockTimeout+`'`); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `DROP TABLE IF EXISTS `+pgx.Identifier{name}.Sanitize())
		return err
	})
	if err != nil {
		return fmt.Errorf("drop partition %s: %w", name, err)
	}
	return nil
}

// isMissingPartition reports whether err is PostgreSQL's "no partition of
// relation found for row" for table: a check violation that names no
// constraint (a CHECK constraint's violation names it) and names the table,
// as a field or, quoted, in the message; either holds whatever the server's
// language.
func isMissingPartition(err error, table string) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "23514" || pgErr.ConstraintName != "" {
		return false
	}
	return pgErr.TableName == table || (pgErr.TableName == "" && strings.Contains(pgErr.Message, `"`+table+`"`))
}

// utcDay is the start of t's UTC day.
func utcDay(t time.Time) time.Time {
	y, m, d := t.UTC().Date()
	return time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
}

// eventDays lists the UTC days of a batch's events, once each.
func eventDays(events []Event) []time.Time {
	var days []time.Time
	for i := range events {
		if d := utcDay(events[i].At); !slices.Contains(days, d) {
			days = append(days, d)
		}
	}
	return days
}
