package fleet

import (
	"context"
	"testing"
	"time"
)

// TestLinkRollupsFromEvents writes disconnects with their links through the
// event writer and reads the fleet's link view from the rollups it keeps: a
// replayed batch counts once, weak and roaming ends are set apart, and the
// congested channel is flagged.
func TestLinkRollupsFromEvents(t *testing.T) {
	ctx := context.Background()
	svc, pool := newService(t)
	now := time.Now().UTC()
	svc.now = func() time.Time { return now }
	var events []Event
	end := func(id string, at time.Time, reason Reason, l SessionLink) {
		events = append(events, Event{ID: NewEventID(at), DeviceID: id, At: at, Kind: KindDisconnect, Reason: reason,
			Model: "gw", Firmware: "1.0", SessionEpoch: int64(len(events) + 1), DurationMillis: (10 * time.Minute).Milliseconds(), SessionLink: l})
	}
	t0 := now.Add(-30 * time.Minute)
	for i := range 10 {
		at := t0.Add(time.Duration(i) * time.Minute)
		end("crowded-1", at, ReasonConnectionLost, SessionLink{RSSI: -60, Channel: 6, BSSID: "c1", FirstBSSID: "c1"})
		end("crowded-2", at, ReasonKeepaliveTimeout, SessionLink{RSSI: -60, Channel: 6, BSSID: "c2", FirstBSSID: "c2"})
		end("weak-1", at, ReasonConnectionLost, SessionLink{RSSI: -84, Channel: 1, BSSID: "a1", FirstBSSID: "a1"})
		end("roamer-1", at, ReasonConnectionLost, SessionLink{RSSI: -60, Channel: 1, BSSID: "a2", FirstBSSID: "a1", RoamMillis: 900})
		end("quiet-1", at, ReasonClientDisconnect, SessionLink{RSSI: -55, Channel: 1, BSSID: "a1", FirstBSSID: "a1"})
		end("quiet-2", at, ReasonClientDisconnect, SessionLink{RSSI: -55, Channel: 11, BSSID: "b1", FirstBSSID: "b1"})
	}
	end("nolink", t0, ReasonConnectionLost, SessionLink{})
	for range 2 { // a replay stores and counts nothing twice
		if err := svc.store.writeEvents(ctx, events); err != nil {
			t.Fatal(err)
		}
	}
	var rows int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM device_events WHERE link_bssid IS NOT NULL`).Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if rows != 60 {
		t.Fatalf("%d events with a link stored, want 60", rows)
	}
	st, err := svc.FleetLinks(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if st.Causes["weak_signal"] != 10 || st.Causes["roaming"] != 10 || st.Causes["congested_channel"] != 20 {
		t.Fatalf("causes %v, want 10 weak, 10 roaming, 20 on the congested channel", st.Causes)
	}
	var congested []int
	for _, c := range st.Channels {
		if c.Congested {
			congested = append(congested, c.Channel)
		}
		if c.Channel == 6 && (c.Disconnects != 20 || c.DeviceHours < 3.3 || c.DeviceHours > 3.34) {
			t.Fatalf("channel 6: %+v, want 20 lost over 20 sessions of 10 minutes", c)
		}
	}
	if len(congested) != 1 || congested[0] != 6 {
		t.Fatalf("congested %v, want [6]: %+v", congested, st.Channels)
	}
	// The maintenance pass prunes the rollup past the minute rollups'
	// retention.
	svc.now = func() time.Time { return now.Add(100 * 24 * time.Hour) }
	if _, err := svc.MaintainEvents(ctx, EventRetention{}); err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM link_rollups_hour`).Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if rows != 0 {
		t.Fatalf("%d link rollup rows left after their retention", rows)
	}
}
