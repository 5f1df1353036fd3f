package fleet

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	gocmp "github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/jackc/pgx/v5/pgxpool"
)

// oracleFirmwareStats is firmwareStats as it was before the rollups: a
// self-join of every connect with its disconnect, which grows with the
// history kept. Only now() became $2, so that both answers count live
// sessions up to the same instant.
const oracleFirmwareStats = `
	WITH sessions AS (
		SELECT c.device_id, c.at AS start_at, d.at AS end_at,
			coalesce(nullif(d.model, ''), c.model) AS model,
			coalesce(nullif(d.firmware, ''), c.firmware) AS firmware,
			d.reason IS NOT NULL AS ended,
			coalesce(` + pingDisconnectSQL + `, false) AS ping_related
		FROM device_events c
		LEFT JOIN device_events d ON d.device_id = c.device_id AND d.session_epoch = c.session_epoch AND d.kind = 'disconnect'
		WHERE c.kind = 'connect' AND coalesce(d.at, $2) >= $1
	)
	SELECT model, firmware, count(DISTINCT device_id),
		coalesce(sum(extract(epoch FROM coalesce(end_at, $2) - greatest(start_at, $1))) / 3600, 0),
		count(*) FILTER (WHERE ended), count(*) FILTER (WHERE ping_related)
	FROM sessions WHERE firmware <> ''
	GROUP BY model, firmware`

func oracleStats(t *testing.T, pool *pgxpool.Pool, since, now time.Time) []FirmwareStats {
	t.Helper()
	rows, err := pool.Query(context.Background(), oracleFirmwareStats, since, now)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []FirmwareStats
	for rows.Next() {
		var st FirmwareStats
		if err := rows.Scan(&st.Model, &st.Firmware, &st.Devices, &st.DeviceHours, &st.Sessions, &st.PingDisconnects); err != nil {
			t.Fatal(err)
		}
		out = append(out, st)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// generateHistory plays a fleet for two days and a half before now: devices
// of two models, each session a connect, a birth and a disconnect whose
// reason is drawn from every kind the verdicts tell apart (malformed
// PINGREQ, keepalive timeout with and without pings, other protocol errors,
// clean ends, lost connections), short and day-long sessions, takeovers (the
// next session connects before the last one's disconnect), an OTA upgrade in
// the middle (the connect still carries the old firmware, the birth and the
// disconnect the new one), first connects without a firmware, and a live
// session at the end for some devices, started long before the window.
// Events come back in time order, as the recorder writes them.
func generateHistory(rng *rand.Rand, now time.Time, devices int) []Event {
	var events []Event
	start := now.Add(-60 * time.Hour)
	reasons := []struct {
		reason Reason
		detail string
		pings  int
	}{
		{ReasonProtocolError, "PINGREQ with reserved flags 0x2", 0},
		{ReasonProtocolError, "PINGREQ with reserved flags 0x2", 3},
		{ReasonProtocolError, "malformed PUBLISH", 0},
		{ReasonKeepaliveTimeout, "", 0},
		{ReasonKeepaliveTimeout, "", 4},
		{ReasonClientDisconnect, "", 2},
		{ReasonConnectionLost, "", 1},
	}
	for i := range devices {
		id := fmt.Sprintf("dev-%03d", i)
		model := []string{"gw-100", "gw-200"}[i%2]
		firmware := []string{"1.0.0", "1.1.0", "2.0.0"}[rng.IntN(3)]
		upgradeAt := start.Add(time.Duration(rng.Int64N(int64(120 * time.Hour)))) // half never upgrade
		connectFirmware := ""
		if rng.IntN(2) == 0 {
			connectFirmware = firmware // not the device's first connect
		}
		at := start.Add(time.Duration(rng.Int64N(int64(time.Hour))))
		for epoch := int64(1); at.Before(now); epoch++ {
			length := time.Duration(rng.Int64N(int64(2*time.Hour))) + time.Duration(rng.Int64N(int64(time.Second)))
			if rng.IntN(10) == 0 {
				length = time.Duration(20+rng.IntN(20)) * time.Hour // spans the window's start
			}
			live := at.Add(length).After(now)
			sessionFirmware := firmware
			if at.After(upgradeAt) {
				sessionFirmware = "3.0.0"
			}
			events = append(events,
				Event{ID: NewEventID(at), DeviceID: id, At: at, Kind: KindConnect, SessionEpoch: epoch, Model: model, Firmware: connectFirmware, ProtocolVersion: 4},
				Event{ID: NewEventID(at), DeviceID: id, At: at.Add(time.Millisecond), Kind: KindBirth, SessionEpoch: epoch, Model: model, Firmware: sessionFirmware})
			connectFirmware = sessionFirmware
			if live {
				break
			}
			end := at.Add(length)
			r := reasons[rng.IntN(len(reasons))]
			next := end.Add(time.Duration(rng.Int64N(int64(10 * time.Minute))))
			if rng.IntN(8) == 0 { // takeover: the next session connects first
				r.reason, r.detail, next = ReasonSessionTakeover, "", end.Add(-time.Millisecond)
			}
			events = append(events, Event{ID: NewEventID(end), DeviceID: id, At: end, Kind: KindDisconnect, SessionEpoch: epoch,
				Reason: r.reason, Detail: r.detail, Pings: r.pings, Model: model, Firmware: sessionFirmware, ProtocolVersion: 4})
			at = next
		}
	}
	slices.SortStableFunc(events, func(a, b Event) int { return a.At.Compare(b.At) })
	return events
}

// TestFirmwareStatsFromRollupsMatchEvents writes a generated history in
// batches of every size and compares firmwareStats, from the rollups, with
// the old query over the events, for windows of several lengths.
func TestFirmwareStatsFromRollupsMatchEvents(t *testing.T) {
	ctx := context.Background()
	svc, pool := newService(t)
	now := time.Now().UTC().Truncate(time.Microsecond)
	rng := rand.New(rand.NewPCG(17, 4))
	events := generateHistory(rng, now, 120)
	for len(events) > 0 {
		n := min(len(events), 1+rng.IntN(400))
		if err := svc.store.writeEvents(ctx, events[:n]); err != nil {
			t.Fatal(err)
		}
		events = events[n:]
	}
	checkOpenSessions(t, pool)
	sortStats := func(s []FirmwareStats) {
		slices.SortFunc(s, func(a, b FirmwareStats) int {
			return cmp.Or(cmp.Compare(a.Model, b.Model), cmp.Compare(a.Firmware, b.Firmware))
		})
	}
	for _, tt := range []struct {
		window time.Duration
		groups int // at least, so that the comparison means something
	}{{time.Hour, 2}, {24 * time.Hour, 6}, {49 * time.Hour, 6}, {100 * time.Hour, 6}} {
		window := tt.window
		t.Run(window.String(), func(t *testing.T) {
			since := now.Add(-window)
			got, err := svc.store.firmwareStatsAt(ctx, since, &now)
			if err != nil {
				t.Fatal(err)
			}
			// The rollups' window starts at the top of the minute.
			want := oracleStats(t, pool, since.Truncate(time.Minute), now)
			sortStats(got)
			sortStats(want)
			if len(want) < tt.groups {
				t.Fatalf("the generated history has only %d groups in the window: %+v", len(want), want)
			}
			if diff := gocmp.Diff(want, got, cmpopts.EquateApprox(1e-12, 0)); diff != "" {
				t.Errorf("firmware statistics from rollups mismatch (-events +rollups):\n%s", diff)
			}
		})
	}
}

// checkOpenSessions checks session_devices' open session counts against
// sessions_open, and that it keeps no row that counts for nothing (a
// session's opening row when it ended on another firmware).
func checkOpenSessions(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	var wrong, empty int
	err := pool.QueryRow(context.Background(), `SELECT
		(SELECT count(*) FROM (SELECT model, firmware, device_id, count(*) AS n FROM sessions_open GROUP BY 1, 2, 3) o
			FULL JOIN (SELECT model, firmware, device_id, open_sessions AS n FROM session_devices WHERE open_sessions <> 0) s
			USING (model, firmware, device_id) WHERE o.n IS DISTINCT FROM s.n),
		(SELECT count(*) FROM session_devices WHERE open_sessions = 0 AND last_end = '-infinity')`).Scan(&wrong, &empty)
	if err != nil {
		t.Fatal(err)
	}
	if wrong != 0 || empty != 0 {
		t.Errorf("session_devices: %d rows whose open sessions differ from sessions_open, %d rows with no session", wrong, empty)
	}
}

// TestFleetHistory counts a few events into buckets of each step.
func TestFleetHistory(t *testing.T) {
	ctx := context.Background()
	svc, _ := newService(t)
	t0 := time.Date(2031, 5, 6, 10, 0, 0, 0, time.UTC)
	svc.now = func() time.Time { return t0.Add(3 * time.Hour) }
	ev := func(at time.Time, kind Kind, reason Reason) Event {
		return Event{ID: NewEventID(at), DeviceID: "d", At: at, Kind: kind, Reason: reason, SessionEpoch: at.UnixMicro(), Firmware: "1.0.0"}
	}
	events := []Event{
		ev(t0.Add(10*time.Second), KindConnect, ""),
		ev(t0.Add(50*time.Second), KindDisconnect, ReasonKeepaliveTimeout),
		ev(t0.Add(70*time.Second), KindConnect, ""),
		ev(t0.Add(6*time.Minute), KindDisconnect, ReasonConnectionLost),
		ev(t0.Add(6*time.Minute+time.Second), KindRefused, ReasonAuthFailed),
		ev(t0.Add(6*time.Minute+2*time.Second), KindRefused, ReasonAuthFailed),
		ev(t0.Add(6*time.Minute+3*time.Second), KindBirth, ""),
		ev(t0.Add(2*time.Hour), KindConnect, ""),
		ev(t0.Add(26*time.Hour), KindConnect, ""),
	}
	if err := svc.store.writeEvents(ctx, events); err != nil {
		t.Fatal(err)
	}
	type bucket struct {
		At                   string
		Connects             int64
		Disconnects, Refused map[Reason]int64
	}
	b := func(at time.Time, connects int64, disconnects, refused map[Reason]int64) bucket {
		if disconnects == nil {
			disconnects = map[Reason]int64{}
		}
		if refused == nil {
			refused = map[Reason]int64{}
		}
		return bucket{at.Format(time.RFC3339), connects, disconnects, refused}
	}
	tests := []struct {
		name string
		q    HistoryQuery
		want []bucket
	}{
		{"minutes", HistoryQuery{From: t0.Add(30 * time.Second), To: t0.Add(3 * time.Minute), Step: "1m"}, []bucket{
			b(t0, 1, map[Reason]int64{ReasonKeepaliveTimeout: 1}, nil), b(t0.Add(time.Minute), 1, nil, nil), b(t0.Add(2*time.Minute), 0, nil, nil)}},
		{"five minutes", HistoryQuery{From: t0, To: t0.Add(10 * time.Minute), Step: "5m"}, []bucket{
			b(t0, 2, map[Reason]int64{ReasonKeepaliveTimeout: 1}, nil),
			b(t0.Add(5*time.Minute), 0, map[Reason]int64{ReasonConnectionLost: 1}, map[Reason]int64{ReasonAuthFailed: 2})}},
		{"hours", HistoryQuery{From: t0.Add(-time.Hour), To: t0.Add(150 * time.Minute), Step: "1h"}, []bucket{
			b(t0.Add(-time.Hour), 0, nil, nil),
			b(t0, 2, map[Reason]int64{ReasonKeepaliveTimeout: 1, ReasonConnectionLost: 1}, map[Reason]int64{ReasonAuthFailed: 2}),
			b(t0.Add(time.Hour), 0, nil, nil), b(t0.Add(2*time.Hour), 1, nil, nil)}},
		{"days", HistoryQuery{From: t0, To: t0.Add(30 * time.Hour), Step: "1d"}, []bucket{
			b(t0.Truncate(24*time.Hour), 3, map[Reason]int64{ReasonKeepaliveTimeout: 1, ReasonConnectionLost: 1}, map[Reason]int64{ReasonAuthFailed: 2}),
			b(t0.Truncate(24*time.Hour).Add(24*time.Hour), 1, nil, nil)}},
		{"defaults: the last 60 minutes", HistoryQuery{}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := svc.FleetHistory(ctx, tt.q)
			if err != nil {
				t.Fatal(err)
			}
			if tt.want == nil {
				if len(h.Buckets) != 60 || h.Step != "1m" || !h.To.Equal(t0.Add(3*time.Hour)) {
					t.Fatalf("default history: %d buckets of %s to %s", len(h.Buckets), h.Step, h.To)
				}
				return
			}
			var got []bucket
			for _, x := range h.Buckets {
				got = append(got, bucket{x.At.UTC().Format(time.RFC3339), x.Connects, x.Disconnects, x.Refused})
			}
			if diff := gocmp.Diff(tt.want, got); diff != "" {
				t.Errorf("buckets mismatch (-want +got):\n%s", diff)
			}
			if !h.From.Equal(h.Buckets[0].At) || !h.To.Equal(h.Buckets[len(h.Buckets)-1].At.Add(HistorySteps[h.Step])) {
				t.Errorf("from %s to %s do not frame the buckets", h.From, h.To)
			}
		})
	}
	for _, bad := range []struct {
		name  string
		q     HistoryQuery
		field string
	}{
		{"unknown step", HistoryQuery{Step: "2m"}, "step"},
		{"empty range", HistoryQuery{From: t0, To: t0}, "to"},
		{"reversed range", HistoryQuery{From: t0, To: t0.Add(-time.Hour)}, "to"},
		{"too many buckets", HistoryQuery{From: t0, To: t0.Add(2001 * time.Minute), Step: "1m"}, "step"},
	} {
		t.Run(bad.name, func(t *testing.T) {
			_, err := svc.FleetHistory(ctx, bad.q)
			var ve *ValidationError
			if !errors.As(err, &ve) || ve.Field != bad.field {
				t.Fatalf("got %v, want a validation error on %s", err, bad.field)
			}
		})
	}
	if h, err := svc.FleetHistory(ctx, HistoryQuery{From: t0, To: t0.Add(2000 * time.Minute), Step: "1m"}); err != nil || len(h.Buckets) != 2000 {
		t.Fatalf("2000 buckets: %d, %v", len(h.Buckets), err)
	}
}
