package telemetry

import (
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

// TestStamperRecordsTheSessionsLink: a disconnect carries the link its own
// session reported (last RSSI and channel, first and last access point, how
// long before the end it roamed), never another session's.
func TestStamperRecordsTheSessionsLink(t *testing.T) {
	in, _, _, clock := newTestIngest(IngestOptions{Rate: -1})
	sink := &eventLog{}
	st := &Stamper{Next: sink, Links: in}
	s1 := Session{DeviceID: "d1", Epoch: 7, Model: "gw"}
	send := func(s Session, payload string) {
		t.Helper()
		if err := in.Handle(s, []byte(payload)); err != nil {
			t.Fatal(err)
		}
		clock.Add(time.Second)
	}
	send(s1, `{"rssi_dbm":-61,"channel":6,"bssid":"02:00:00:00:00:01"}`)
	send(s1, `{"rssi_dbm":-70.6,"uptime_s":5}`)
	send(s1, `{"bssid":"02:00:00:00:00:02"}`) // roams
	clock.Add(2 * time.Second)
	end := clock.Now()
	st.Record(fleet.Event{Kind: fleet.KindDisconnect, DeviceID: "d1", SessionEpoch: 7, At: end})
	want := fleet.SessionLink{RSSI: -71, Channel: 6, BSSID: "02:00:00:00:00:02", FirstBSSID: "02:00:00:00:00:01", RoamMillis: 3000}
	if got := sink.events[0].SessionLink; got != want {
		t.Fatalf("stamped %+v, want %+v", got, want)
	}

	// The next session starts over: its disconnect carries only what it
	// reported, and a disconnect of a session that reported nothing, or of
	// another device, carries nothing.
	send(Session{DeviceID: "d1", Epoch: 8}, `{"rssi_dbm":-50}`)
	st.Record(fleet.Event{Kind: fleet.KindDisconnect, DeviceID: "d1", SessionEpoch: 8, At: clock.Now()})
	st.Record(fleet.Event{Kind: fleet.KindDisconnect, DeviceID: "d1", SessionEpoch: 9, At: clock.Now()})
	st.Record(fleet.Event{Kind: fleet.KindDisconnect, DeviceID: "d2", SessionEpoch: 8, At: clock.Now()})
	st.Record(fleet.Event{Kind: fleet.KindConnect, DeviceID: "d1", SessionEpoch: 8, At: clock.Now()})
	if got := sink.events[1].SessionLink; got != (fleet.SessionLink{RSSI: -50}) {
		t.Fatalf("next session stamped %+v, want RSSI -50 only", got)
	}
	for i, e := range sink.events[2:] {
		if e.Reported() {
			t.Fatalf("event %d stamped %+v, want nothing", i+2, e.SessionLink)
		}
	}

	// An RSSI no radio reports is not recorded; a Stamper without an
	// ingest passes events through.
	send(Session{DeviceID: "d3", Epoch: 1}, `{"rssi_dbm":12,"channel":11}`)
	st.Record(fleet.Event{Kind: fleet.KindDisconnect, DeviceID: "d3", SessionEpoch: 1, At: clock.Now()})
	if got := sink.events[len(sink.events)-1].SessionLink; got != (fleet.SessionLink{Channel: 11}) {
		t.Fatalf("stamped %+v, want channel 11 only", got)
	}
	(&Stamper{Next: sink}).Record(fleet.Event{Kind: fleet.KindDisconnect, DeviceID: "d1", SessionEpoch: 8})
}
