package fleet

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// TestScaleMeasure is a measurement, not a test: with FLEETD_SCALE_EVENTS
// set (e.g. 2000000) it loads that many events of a day across
// FLEETD_SCALE_DEVICES devices (default 20000) through the writer, and logs
// how long fleet health and one analysis take from the rollups, and how long
// the queries they replaced take over an unpartitioned copy of the same
// events (device_events_flat, with the old schema and indexes), which is
// also written batch by batch with the old write path, to compare ingest.
//
//	FLEETD_SCALE_EVENTS=2000000 go test -race -count=1 -run TestScaleMeasure -v -timeout 1h ./fleet/
func TestScaleMeasure(t *testing.T) {
	total, _ := strconv.Atoi(os.Getenv("FLEETD_SCALE_EVENTS"))
	if total == 0 {
		t.Skip("set FLEETD_SCALE_EVENTS to measure")
	}
	devices, _ := strconv.Atoi(os.Getenv("FLEETD_SCALE_DEVICES"))
	if devices == 0 {
		devices = 20000
	}
	ctx := context.Background()
	svc, pool := newService(t)
	exec := func(q string, args ...any) {
		t.Helper()
		if _, err := pool.Exec(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	ids := make([]string, devices)
	models := make([]string, devices)
	for i := range ids {
		ids[i], models[i] = fmt.Sprintf("scale-%05d", i), []string{"gw-100", "gw-200", "sensor-1"}[i%3]
	}
	exec(`INSERT INTO devices (id, model) SELECT * FROM unnest($1::text[], $2::text[])`, ids, models)
	// The table as it was before migration 00012, for the old queries.
	exec(`CREATE TABLE device_events_flat (LIKE device_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)`)
	exec(`ALTER TABLE device_events_flat ADD PRIMARY KEY (id)`)
	exec(`CREATE INDEX ON device_events_flat (device_id, at DESC, id DESC)`)
	exec(`CREATE INDEX ON device_events_flat (at)`)
	exec(`CREATE INDEX ON device_events_flat (device_id, session_epoch) WHERE kind IN ('connect', 'disconnect')`)

	now := time.Now()
	svc.now = func() time.Time { return now }
	var newWrite, oldWrite time.Duration
	written, batches := 0, 0
	scaleHistory(rand.New(rand.NewPCG(1, 2)), now, ids, models, total, func(b []Event) {
		// Both paths apply the presence updates; the second finds them
		// applied, so they take turns being first.
		paths := []func() (*time.Duration, error){
			func() (*time.Duration, error) { return &newWrite, svc.store.writeEvents(ctx, b) },
			func() (*time.Duration, error) { return &oldWrite, oldWriteEvents(ctx, pool, b) },
		}
		if batches%2 == 1 {
			paths[0], paths[1] = paths[1], paths[0]
		}
		for _, write := range paths {
			start := time.Now()
			took, err := write()
			if err != nil {
				t.Fatal(err)
			}
			*took += time.Since(start)
		}
		written += len(b)
		batches++
	})
	t.Logf("wrote %d events across %d devices in %d batches: %.0f events/s with partitions and rollups, %.0f events/s the old way",
		written, devices, batches, float64(written)/newWrite.Seconds(), float64(written)/oldWrite.Seconds())
	exec(`VACUUM ANALYZE`)
	var rollupRows, sessionRows, openRows int
	pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM event_rollups_minute), (SELECT count(*) FROM session_rollups_minute), (SELECT count(*) FROM sessions_open)`).
		Scan(&rollupRows, &sessionRows, &openRows)
	t.Logf("rollups: %d event rows a minute-group, %d session rows, %d open sessions", rollupRows, sessionRows, openRows)
	if err := svc.LoadPolicy(ctx); err != nil {
		t.Fatal(err)
	}

	timeIt := func(what string, runs int, f func() error) {
		t.Helper()
		var took []time.Duration
		for range runs {
			start := time.Now()
			if err := f(); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			took = append(took, time.Since(start))
		}
		slices.Sort(took)
		t.Logf("%-40s min %8s  median %8s  max %8s", what, took[0].Round(time.Millisecond/10), took[len(took)/2].Round(time.Millisecond/10), took[len(took)-1].Round(time.Millisecond/10))
	}
	timeIt("fleet health (rollups)", 7, func() error { _, err := svc.FleetHealth(ctx); return err })
	timeIt("firmware statistics (rollups)", 7, func() error { _, err := svc.store.firmwareStats(ctx, now.Add(-24*time.Hour)); return err })
	timeIt("analysis (rollups)", 3, func() error { return svc.Analyze(ctx) })
	timeIt("fleet history, a day by 5m (rollups)", 7, func() error {
		_, err := svc.FleetHistory(ctx, HistoryQuery{From: now.Add(-24 * time.Hour), To: now, Step: "5m"})
		return err
	})
	timeIt("fleet history, a day by 1h (rollups)", 7, func() error {
		_, err := svc.FleetHistory(ctx, HistoryQuery{From: now.Add(-24 * time.Hour), To: now, Step: "1h"})
		return err
	})

	flat := func(q string) string { return strings.ReplaceAll(q, "device_events", "device_events_flat") }
	oldDisconnects := flat(`SELECT firmware, protocol_version, reason, count(*) FROM device_events
		WHERE kind = 'disconnect' AND at >= $1 GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3`)
	oldFlapping := flat(`SELECT device_id, count(*) FILTER (WHERE kind = 'connect'),
			coalesce(mode() WITHIN GROUP (ORDER BY reason) FILTER (WHERE kind = 'disconnect'), '')
		FROM device_events WHERE at >= $1 AND kind IN ('connect', 'disconnect')
		GROUP BY device_id HAVING count(*) FILTER (WHERE kind = 'connect') > $2
		ORDER BY 2 DESC, 1 LIMIT 100`)
	query := func(q string, args ...any) error {
		rows, err := pool.Query(ctx, q, args...)
		if err != nil {
			return err
		}
		for rows.Next() {
		}
		rows.Close()
		return rows.Err()
	}
	timeIt("fleet health's event queries (old)", 7, func() error {
		for _, since := range []time.Time{now.Add(-time.Hour), now.Add(-24 * time.Hour)} {
			if err := query(oldDisconnects, since); err != nil {
				return err
			}
		}
		return query(oldFlapping, now.Add(-10*time.Minute), 5)
	})
	timeIt("fleet health's event queries (rollups)", 7, func() error {
		for _, since := range []time.Time{now.Add(-time.Hour), now.Add(-24 * time.Hour)} {
			if _, err := svc.store.disconnectCounts(ctx, since); err != nil {
				return err
			}
		}
		return query(strings.ReplaceAll(oldFlapping, "device_events_flat", "device_events"), now.Add(-10*time.Minute), 5)
	})
	timeIt("firmware statistics (old)", 3, func() error { return query(flat(oracleFirmwareStats), now.Add(-24*time.Hour), now) })
}

// scaleHistory plays devices for the day before now, in batches of 5000 in
// time order given to write: sessions of about 40 minutes, a few minutes
// apart, ended for the reasons a real fleet sees, with one firmware whose
// sessions end on malformed PINGREQs, until total events are made.
func scaleHistory(rng *rand.Rand, now time.Time, ids, models []string, total int, write func([]Event)) {
	type state struct {
		next      time.Time // the next event
		connected bool
		epoch     int64
		firmware  string
	}
	start := now.Add(-24 * time.Hour)
	st := make([]state, len(ids))
	for i := range st {
		st[i] = state{next: start.Add(time.Duration(rng.Int64N(int64(time.Hour)))), firmware: []string{"1.0.0", "1.1.0", "1.2.0"}[rng.IntN(3)]}
	}
	perDevice := max(total/len(ids), 3)
	span := 24 * time.Hour / time.Duration(perDevice/3)
	var batch []Event
	made := 0
	for slice := start; slice.Before(now) && made < total; slice = slice.Add(time.Minute) {
		end := slice.Add(time.Minute)
		for i := range st {
			s := &st[i]
			for s.next.Before(end) && made < total {
				at := s.next
				if !s.connected {
					s.epoch++
					batch = append(batch,
						Event{ID: NewEventID(at), DeviceID: ids[i], At: at, Kind: KindConnect, SessionEpoch: s.epoch, Model: models[i], Firmware: s.firmware, ProtocolVersion: 4, BrokerNode: "n1"},
						Event{ID: NewEventID(at), DeviceID: ids[i], At: at.Add(time.Millisecond), Kind: KindBirth, SessionEpoch: s.epoch, Model: models[i], Firmware: s.firmware, BrokerNode: "n1"})
					s.connected, s.next = true, at.Add(time.Duration(rng.ExpFloat64()*float64(span)*0.9))
					made += 2
					continue
				}
				reason, detail, pings := ReasonClientDisconnect, "", 3
				switch r := rng.IntN(10); {
				case s.firmware == "1.1.0" && models[i] == "gw-100" && r < 8:
					reason, detail, pings = ReasonProtocolError, "PINGREQ with reserved flags 0x2", 0
				case r < 3:
					reason = ReasonConnectionLost
				case r < 4:
					reason, pings = ReasonKeepaliveTimeout, 0
				}
				batch = append(batch, Event{ID: NewEventID(at), DeviceID: ids[i], At: at, Kind: KindDisconnect, SessionEpoch: s.epoch, Reason: reason,
					Detail: detail, Pings: pings, Model: models[i], Firmware: s.firmware, ProtocolVersion: 4, BrokerNode: "n1"})
				s.connected, s.next = false, at.Add(time.Duration(rng.ExpFloat64()*float64(span)*0.1))
				made++
			}
		}
		slices.SortFunc(batch, func(a, b Event) int { return a.At.Compare(b.At) })
		for len(batch) >= 5000 {
			write(batch[:5000:5000])
			batch = batch[5000:]
		}
	}
	if len(batch) > 0 {
		write(batch)
	}
}

// oldWriteEvents is the write path before the partitions and rollups
// (COPY into a temporary table, INSERT … ON CONFLICT (id), the presence
// updates), into device_events_flat.
func oldWriteEvents(ctx context.Context, pool *pgxpool.Pool, events []Event) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `CREATE TEMP TABLE IF NOT EXISTS device_events_flat_in (LIKE device_events_flat) ON COMMIT DELETE ROWS`); err != nil {
			return err
		}
		_, err := tx.CopyFrom(ctx, pgx.Identifier{"device_events_flat_in"}, eventColumns, pgx.CopyFromSlice(len(events), func(i int) ([]any, error) {
			return eventRow(&events[i]), nil
		}))
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO device_events_flat SELECT * FROM device_events_flat_in ON CONFLICT (id) DO NOTHING`); err != nil {
			return err
		}
		return applyPresence(ctx, tx, collapsePresence(events))
	})
}
