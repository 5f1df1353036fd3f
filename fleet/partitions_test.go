package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/internal/pgtest"
)

func partitionNames(t *testing.T, s *Store) []string {
	t.Helper()
	parts, err := s.partitions(context.Background(), "device_events")
	if err != nil {
		t.Fatal(err)
	}
	names := []string{}
	for _, p := range parts {
		names = append(names, p.name)
	}
	return names
}

func days(from time.Time, n int) []string {
	var out []string
	for i := range n {
		out = append(out, partitionName("device_events", from.AddDate(0, 0, i)))
	}
	return out
}

// countBy runs a query that returns (key, count) rows.
func countBy(t *testing.T, pool *pgxpool.Pool, q string, args ...any) map[string]int64 {
	t.Helper()
	rows, err := pool.Query(context.Background(), q, args...)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var k string
		var n int64
		if err := rows.Scan(&k, &n); err != nil {
			t.Fatal(err)
		}
		out[k] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestEventPartitionsAheadAndRetention runs the maintenance at a clock of its
// own with a short retention: it creates today's partition and the days
// ahead, and later drops the partitions entirely older than the retention
// (their events with them) and the rollups past theirs, keeping the rest.
func TestEventPartitionsAheadAndRetention(t *testing.T) {
	ctx := context.Background()
	svc, pool := newService(t)
	day0 := time.Date(2031, 3, 10, 0, 0, 0, 0, time.UTC)
	now := day0.Add(9 * time.Hour)
	svc.now = func() time.Time { return now }
	r := EventRetention{Events: 72 * time.Hour, MinuteRollups: 96 * time.Hour, HourlyRollups: 240 * time.Hour, DaysAhead: 3}

	m, err := svc.MaintainEvents(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(days(day0, 4), m.Created); diff != "" {
		t.Fatalf("partitions created (-want +got):\n%s", diff)
	}
	if m, err := svc.MaintainEvents(ctx, r); err != nil || len(m.Created)+len(m.Dropped) != 0 {
		t.Fatalf("second pass at the same time: %+v, %v; want nothing to do", m, err)
	}

	// A session at 11:00 on each of the four days.
	register(t, svc, "gw-100", "d1")
	for i := range 4 {
		at := day0.AddDate(0, 0, i).Add(11 * time.Hour)
		epoch := int64(i + 1)
		err := svc.store.writeEvents(ctx, []Event{
			{ID: NewEventID(at), DeviceID: "d1", At: at, Kind: KindConnect, SessionEpoch: epoch, Model: "gw-100", Firmware: "1.0.0"},
			{ID: NewEventID(at), DeviceID: "d1", At: at.Add(time.Minute), Kind: KindDisconnect, SessionEpoch: epoch, Reason: ReasonConnectionLost, Model: "gw-100", Firmware: "1.0.0"},
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	// Two sessions open since the first day: d2's disconnect was never
	// stored (its device shows it offline), d3's device is still online in
	// it. Retention ends the first, keeps the second.
	register(t, svc, "gw-100", "d2", "d3")
	at := day0.Add(11 * time.Hour)
	if err := svc.store.writeEvents(ctx, []Event{
		{ID: NewEventID(at), DeviceID: "d2", At: at, Kind: KindConnect, SessionEpoch: 1, Model: "gw-100", Firmware: "1.0.0"},
		{ID: NewEventID(at), DeviceID: "d3", At: at, Kind: KindConnect, SessionEpoch: 1, Model: "gw-100", Firmware: "1.0.0"},
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `UPDATE devices SET online = false WHERE id = 'd2'`); err != nil {
		t.Fatal(err)
	}

	// Five days later: events kept from 03-12 09:00, minute rollups from
	// 03-11 09:00, hourly ones from 03-05 09:00.
	now = day0.AddDate(0, 0, 5).Add(9 * time.Hour)
	m, err = svc.MaintainEvents(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(days(day0, 2), m.Dropped); diff != "" {
		t.Errorf("partitions dropped (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(days(day0.AddDate(0, 0, 5), 4), m.Created); diff != "" {
		t.Errorf("partitions created (-want +got):\n%s", diff)
	}
	want := append(days(day0.AddDate(0, 0, 2), 2), days(day0.AddDate(0, 0, 5), 4)...)
	if diff := cmp.Diff(want, partitionNames(t, svc.store)); diff != "" {
		t.Errorf("partitions after the retention pass (-want +got):\n%s", diff)
	}
	for _, name := range days(day0, 2) {
		var exists bool
		if err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, name).Scan(&exists); err != nil || exists {
			t.Errorf("table %s still exists (%v): a dropped partition is a dropped table", name, err)
		}
	}
	day := `to_char(%s AT TIME ZONE 'UTC', 'MM-DD')`
	checks := []struct {
		what, sql string
		want      map[string]int64
	}{
		{"events by day", `SELECT ` + fmt.Sprintf(day, "at") + `, count(*) FROM device_events GROUP BY 1`,
			map[string]int64{"03-12": 2, "03-13": 2}},
		{"minute rollups by day", `SELECT ` + fmt.Sprintf(day, "minute") + `, sum(count)::bigint FROM event_rollups_minute GROUP BY 1`,
			map[string]int64{"03-11": 2, "03-12": 2, "03-13": 2}},
		{"hourly rollups by day", `SELECT ` + fmt.Sprintf(day, "hour") + `, sum(count)::bigint FROM event_rollups_hour GROUP BY 1`,
			map[string]int64{"03-10": 4, "03-11": 2, "03-12": 2, "03-13": 2}},
		{"session rollups by day", `SELECT ` + fmt.Sprintf(day, "minute") + `, sum(ended)::bigint FROM session_rollups_minute GROUP BY 1`,
			map[string]int64{"03-11": 1, "03-12": 1, "03-13": 1}},
		{"open sessions", `SELECT device_id, count(*) FROM sessions_open GROUP BY 1`, map[string]int64{"d3": 1}},
		{"devices of the verdicts' window, with their open sessions", `SELECT device_id, open_sessions::bigint FROM session_devices`,
			map[string]int64{"d1": 0, "d3": 1}},
	}
	for _, c := range checks {
		if diff := cmp.Diff(c.want, countBy(t, pool, c.sql)); diff != "" {
			t.Errorf("%s mismatch (-want +got):\n%s", c.what, diff)
		}
	}

	// Another replica holding the maintenance lock makes the pass.
	release, ok, err := svc.store.tryAdvisoryLock(ctx, eventMaintenanceLock)
	if err != nil || !ok {
		t.Fatalf("take the maintenance lock: %v, %v", ok, err)
	}
	defer release()
	if m, err := svc.MaintainEvents(ctx, r); err != nil || !m.Skipped {
		t.Fatalf("pass while another replica holds the lock: %+v, %v; want skipped", m, err)
	}
}

// TestMigratedDatabaseHasPartitionsAhead: a fresh database has today's
// partition and the week after it, before any maintenance pass.
func TestMigratedDatabaseHasPartitionsAhead(t *testing.T) {
	s := NewStore(pgtest.New(t))
	got := map[string]bool{}
	for _, n := range partitionNames(t, s) {
		got[n] = true
	}
	// The template was migrated when the tests started, maybe yesterday.
	for _, want := range days(utcDay(time.Now()), 7) {
		if !got[want] {
			t.Errorf("no partition %s; have %v", want, got)
		}
	}
}

// TestEventsForADayWithoutPartition records events for days that have no
// partition (long past, around a midnight, far ahead) among ordinary ones:
// the writer creates the partitions and stores every event; none is
// dead-lettered, and a replay stores nothing twice.
func TestEventsForADayWithoutPartition(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.New(t)
	store := NewStore(pool)
	now := time.Now().UTC()
	ats := []time.Time{
		time.Date(2001, 2, 3, 23, 59, 59, 999_999_000, time.UTC),
		time.Date(2001, 2, 4, 0, 0, 0, 0, time.UTC),
		now,
		now.AddDate(1, 1, 0),
	}
	var events []Event
	for i, at := range ats {
		events = append(events, Event{ID: NewEventID(at), DeviceID: fmt.Sprintf("d%d", i), At: at, Kind: KindRefused, Reason: ReasonAuthFailed})
	}
	record := func() {
		t.Helper()
		rec, err := NewRecorder(store, RecorderOptions{SpoolPath: filepath.Join(t.TempDir(), "events.jsonl"),
			Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range events {
			rec.Record(e)
		}
		if err := rec.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if n := len(deadLetters(t, pool)); n != 0 {
			t.Fatalf("%d events dead-lettered, want none", n)
		}
	}
	record()
	record() // a replay
	stored := storedEventIDs(t, pool)
	for _, e := range events {
		if !stored[e.ID.String()] {
			t.Errorf("event at %s not stored", e.At)
		}
	}
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM device_events`).Scan(&n); err != nil || n != len(events) {
		t.Errorf("device_events holds %d rows (%v), want %d", n, err, len(events))
	}
	got := map[string]bool{}
	for _, p := range partitionNames(t, store) {
		got[p] = true
	}
	for _, at := range ats {
		if name := partitionName("device_events", utcDay(at)); !got[name] {
			t.Errorf("no partition %s for the event at %s", name, at)
		}
	}
	refused := countBy(t, pool, `SELECT reason, sum(count)::bigint FROM event_rollups_minute WHERE kind = 'refused' GROUP BY 1`)
	if refused["auth_failed"] != int64(len(events)) {
		t.Errorf("refusals in the rollups: %v, want %d auth_failed", refused, len(events))
	}
}

// TestRollupsCountReplaysOnce writes a batch, the same batch again (a spool
// replay), and a batch half old and half new, with an event twice in it:
// every rollup counts each event, and each session, once.
func TestRollupsCountReplaysOnce(t *testing.T) {
	ctx := context.Background()
	svc, pool := newService(t)
	now := time.Now().UTC().Truncate(time.Minute).Add(-10 * time.Minute)
	register(t, svc, "gw-100", "a", "b", "c")
	session := func(id string, epoch int64, start time.Time) []Event {
		return []Event{
			{ID: NewEventID(start), DeviceID: id, At: start, Kind: KindConnect, SessionEpoch: epoch, Model: "gw-100", Firmware: "1.0.0", ProtocolVersion: 4},
			{ID: NewEventID(start), DeviceID: id, At: start.Add(time.Second), Kind: KindBirth, SessionEpoch: epoch, Model: "gw-100", Firmware: "1.0.1"},
			{ID: NewEventID(start), DeviceID: id, At: start.Add(90 * time.Second), Kind: KindDisconnect, SessionEpoch: epoch, Reason: ReasonKeepaliveTimeout,
				Model: "gw-100", Firmware: "1.0.1", ProtocolVersion: 4},
		}
	}
	var first []Event
	for i, id := range []string{"a", "b", "c"} {
		first = append(first, session(id, 1, now.Add(time.Duration(i)*time.Second))...)
	}
	first = append(first, Event{ID: NewEventID(now), DeviceID: "x", At: now, Kind: KindRefused, Reason: ReasonAuthFailed})
	second := append(session("a", 2, now.Add(3*time.Minute)), first[:5]...)
	second = append(second, second[0])
	for _, batch := range [][]Event{first, first, second} {
		if err := svc.store.writeEvents(ctx, batch); err != nil {
			t.Fatal(err)
		}
	}

	wantKinds := map[string]int64{"connect": 4, "birth": 4, "disconnect": 4, "refused": 1}
	for _, table := range []string{"event_rollups_minute", "event_rollups_hour"} {
		got := countBy(t, pool, `SELECT kind, sum(count)::bigint FROM `+table+` GROUP BY 1`)
		if diff := cmp.Diff(wantKinds, got); diff != "" {
			t.Errorf("%s by kind (-want +got):\n%s", table, diff)
		}
	}
	sessions := countBy(t, pool, `SELECT 'ended ' || firmware, sum(ended)::bigint FROM session_rollups_minute GROUP BY 1
		UNION ALL SELECT 'started ' || firmware, sum(started)::bigint FROM session_rollups_minute GROUP BY 1
		UNION ALL SELECT 'pings ' || firmware, sum(ping_disconnects)::bigint FROM session_rollups_minute GROUP BY 1
		UNION ALL SELECT 'open', count(*) FROM sessions_open
		UNION ALL SELECT 'devices', count(*) FROM session_devices`)
	wantSessions := map[string]int64{"ended 1.0.1": 4, "started 1.0.1": 4, "pings 1.0.1": 4, "open": 0, "devices": 3}
	if diff := cmp.Diff(wantSessions, sessions); diff != "" {
		t.Errorf("session rollups (-want +got):\n%s", diff)
	}
	stats, err := svc.store.firmwareStats(ctx, now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	wantStats := []FirmwareStats{{Model: "gw-100", Firmware: "1.0.1", Devices: 3, DeviceHours: 4 * 90.0 / 3600, PingDisconnects: 4, Sessions: 4}}
	if diff := cmp.Diff(wantStats, stats); diff != "" {
		t.Errorf("firmware statistics (-want +got):\n%s", diff)
	}
	h, err := svc.FleetHealth(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantCounts := []DisconnectCount{{Firmware: "1.0.1", Protocol: 4, Reason: ReasonKeepaliveTimeout, Count: 4}}
	if diff := cmp.Diff(wantCounts, h.Disconnects.LastHour); diff != "" {
		t.Errorf("disconnects in the last hour (-want +got):\n%s", diff)
	}
}

func TestIsMissingPartition(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"no partition", fmt.Errorf("insert events: %w", &pgconn.PgError{Code: "23514", TableName: "device_events",
			Message: `no partition of relation "device_events" found for row`}), true},
		{"no partition, no table field", &pgconn.PgError{Code: "23514", Message: `no partition of relation "device_events" found for row`}, true},
		{"another table's partitions", &pgconn.PgError{Code: "23514", TableName: "telemetry_points"}, false},
		{"a CHECK constraint", &pgconn.PgError{Code: "23514", TableName: "device_events", ConstraintName: "device_events_kind_check"}, false},
		{"another error", &pgconn.PgError{Code: "23505", TableName: "device_events"}, false},
		{"not from the server", errors.New(`no partition of relation "device_events" found for row`), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := isMissingPartition(tt.err, "device_events"); got != tt.want {
				t.Errorf("isMissingPartition(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}
