package migrations_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Migration 00012 moves the events of an unpartitioned device_events into
// one partition per day, keeps every index the queries use, and fills the
// rollups from them.
func TestEventsMigrationPartitionsExistingEvents(t *testing.T) {
	ctx := context.Background()
	pool, p := migratedTo(t, 11)

	// Sessions 40 days ago, yesterday and today (one of them live), and a
	// refused attempt, for two devices.
	today := time.Now().UTC().Truncate(24 * time.Hour)
	type ev struct {
		id, device   string
		at           time.Time
		kind, reason string
		epoch        int64
		firmware     string
		pings        int
	}
	var events []ev
	add := func(device string, epoch int64, start time.Time, length time.Duration, reason string) {
		n := len(events)
		events = append(events, ev{fmt.Sprintf("00000000-0000-7000-8000-%012d", n), device, start, "connect", "", epoch, "1.0.0", 0})
		if reason != "" {
			events = append(events, ev{fmt.Sprintf("00000000-0000-7000-8000-%012d", n+1), device, start.Add(length), "disconnect", reason, epoch, "1.0.1", 0})
		}
	}
	add("gw-1", 1, today.AddDate(0, 0, -40).Add(10*time.Hour), 30*time.Minute, "keepalive_timeout")
	add("gw-1", 2, today.AddDate(0, 0, -1).Add(23*time.Hour+50*time.Minute), 20*time.Minute, "client_disconnect") // across midnight
	add("gw-2", 1, today.AddDate(0, 0, -1).Add(8*time.Hour), 90*time.Second, "keepalive_timeout")
	add("gw-2", 2, today.Add(30*time.Second), 0, "") // live
	events = append(events, ev{"00000000-0000-7000-8000-999999999999", "", today.Add(time.Minute), "refused", "auth_failed", 0, "", 0})
	for _, e := range events {
		if _, err := pool.Exec(ctx, `INSERT INTO device_events (id, device_id, at, kind, reason, session_epoch, firmware, model, pings)
			VALUES ($1, $2, $3, $4, $5, $6, $7, 'gw-100', $8)`, e.id, e.device, e.at, e.kind, e.reason, e.epoch, e.firmware, e.pings); err != nil {
			t.Fatal(err)
		}
	}

	if _, err := p.UpTo(ctx, 12); err != nil {
		t.Fatal(err)
	}

	var kind string
	if err := pool.QueryRow(ctx, `SELECT relkind::text FROM pg_class WHERE oid = 'device_events'::regclass`).Scan(&kind); err != nil || kind != "p" {
		t.Fatalf("device_events relkind %q (%v), want a partitioned table", kind, err)
	}
	var gone bool
	if err := pool.QueryRow(ctx, `SELECT to_regclass('device_events_unpartitioned') IS NULL`).Scan(&gone); err != nil || !gone {
		t.Errorf("the unpartitioned table is still there (%v)", err)
	}

	// Every event moved, each into its day's partition.
	rows, err := pool.Query(ctx, `SELECT id::text, tableoid::regclass::text FROM device_events ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	moved, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([2]string, error) {
		var v [2]string
		err := r.Scan(&v[0], &v[1])
		return v, err
	})
	if err != nil {
		t.Fatal(err)
	}
	var want [][2]string
	for _, e := range events {
		want = append(want, [2]string{e.id, "device_events_p" + e.at.Format("20060102")})
	}
	if diff := cmp.Diff(want, moved); diff != "" {
		t.Errorf("events and their partitions (-want +got):\n%s", diff)
	}

	// A partition for each day with events and for the week ahead.
	parts := map[string]bool{}
	rows, err = pool.Query(ctx, `SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'device_events'::regclass`)
	if err != nil {
		t.Fatal(err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		parts[n] = true
	}
	for _, d := range []time.Time{today.AddDate(0, 0, -40), today.AddDate(0, 0, -1), today, today.AddDate(0, 0, 7)} {
		if name := "device_events_p" + d.Format("20060102"); !parts[name] {
			t.Errorf("no partition %s; have %v", name, names)
		}
	}

	// The keys and indexes the queries use.
	var pk string
	if err := pool.QueryRow(ctx, `SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'device_events'::regclass AND contype = 'p'`).Scan(&pk); err != nil || pk != "PRIMARY KEY (id, at)" {
		t.Errorf("primary key %q (%v), want PRIMARY KEY (id, at)", pk, err)
	}
	rows, err = pool.Query(ctx, `SELECT indexname FROM pg_indexes WHERE tablename = 'device_events' ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	indexes, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"device_events_at_idx", "device_events_device_at_idx", "device_events_pkey", "device_events_session_idx"}, indexes); diff != "" {
		t.Errorf("indexes of device_events (-want +got):\n%s", diff)
	}

	// A replayed event is still stored once; a bad kind is still refused.
	e := events[0]
	tag, err := pool.Exec(ctx, `INSERT INTO device_events (id, device_id, at, kind) VALUES ($1, $2, $3, $4) ON CONFLICT (id, at) DO NOTHING`, e.id, e.device, e.at, e.kind)
	if err != nil || tag.RowsAffected() != 0 {
		t.Errorf("replayed event: %v rows, %v; want none inserted", tag.RowsAffected(), err)
	}
	_, err = pool.Exec(ctx, `INSERT INTO device_events (id, device_id, at, kind) VALUES (gen_random_uuid(), 'x', now(), 'bogus')`)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.ConstraintName != "device_events_kind_check" {
		t.Errorf("event of an unknown kind: %v, want a violation of device_events_kind_check", err)
	}

	// The rollups hold the events moved.
	counts := func(q string) map[string]int64 {
		t.Helper()
		rows, err := pool.Query(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]int64{}
		for rows.Next() {
			var k string
			var n int64
			if err := rows.Scan(&k, &n); err != nil {
				t.Fatal(err)
			}
			out[k] = n
		}
		return out
	}
	for _, q := range []struct {
		name, sql string
		want      map[string]int64
	}{
		{"minute rollups", `SELECT kind || ' ' || reason, sum(count)::bigint FROM event_rollups_minute GROUP BY 1`,
			map[string]int64{"connect ": 4, "disconnect keepalive_timeout": 2, "disconnect client_disconnect": 1, "refused auth_failed": 1}},
		{"hourly rollups", `SELECT kind || ' ' || reason, sum(count)::bigint FROM event_rollups_hour GROUP BY 1`,
			map[string]int64{"connect ": 4, "disconnect keepalive_timeout": 2, "disconnect client_disconnect": 1, "refused auth_failed": 1}},
		{"sessions", `SELECT firmware, sum(ended)::bigint FROM session_rollups_minute GROUP BY 1
			UNION ALL SELECT 'pings', sum(ping_disconnects)::bigint FROM session_rollups_minute
			UNION ALL SELECT 'connected seconds', (sum(end_offset_us - start_offset_us + (ended - started) * (extract(epoch FROM minute - timestamptz '2000-01-01 00:00:00+00') * 1000000)::bigint) / 1000000)::bigint FROM session_rollups_minute
			UNION ALL SELECT 'open ' || device_id || ' ' || firmware, session_epoch FROM sessions_open
			UNION ALL SELECT 'devices', count(*) FROM session_devices`,
			map[string]int64{"1.0.1": 3, "pings": 2, "connected seconds": 30*60 + 20*60 + 90, "open gw-2 1.0.0": 2, "devices": 2}},
	} {
		if diff := cmp.Diff(q.want, counts(q.sql)); diff != "" {
			t.Errorf("%s after the migration (-want +got):\n%s", q.name, diff)
		}
	}

	// 00024 drops the session index, which nothing reads since the session
	// rollups, from the table and from every partition.
	if _, err := p.Up(ctx); err != nil {
		t.Fatal(err)
	}
	rows, err = pool.Query(ctx, `SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indrelid
		WHERE h.inhparent = 'device_events'::regclass AND i.indexrelid::regclass::text LIKE '%session%'`)
	if err != nil {
		t.Fatal(err)
	}
	left, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	rows, err = pool.Query(ctx, `SELECT indexname FROM pg_indexes WHERE tablename = 'device_events' ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	indexes, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"device_events_at_idx", "device_events_device_at_idx", "device_events_pkey"}, indexes); diff != "" || len(left) > 0 {
		t.Errorf("indexes of device_events after 00024 (-want +got):\n%s; session indexes left on partitions: %v", diff, left)
	}
}
