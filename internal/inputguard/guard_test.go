package inputguard

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

type sink []fleet.Event

func (s *sink) Record(e fleet.Event) { *s = append(*s, e) }

func TestGuard(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	var events sink
	counts := map[string]int{}
	g := New(Options{What: "configuration report", Rate: 1, Burst: 2, Count: func(r string) { counts[r]++ },
		Events: &events, Node: "r1", Now: func() time.Time { return now }, Logger: slog.New(slog.DiscardHandler)})
	s1 := Session{DeviceID: "gw-1", Epoch: 1, Firmware: "1.0.0", Model: "gw-100"}
	var admitted int
	for range 5 {
		if g.Admit(s1) {
			admitted++
		}
	}
	if admitted != 2 || counts["rate"] != 3 {
		t.Fatalf("admitted %d, refused for the rate %d; want the burst of 2 and 3 refused", admitted, counts["rate"])
	}
	g.Refuse(s1, "malformed", "not JSON")
	if len(events) != 1 || !strings.Contains(events[0].Detail, "configuration reports above 1 per second (burst 2) dropped") ||
		events[0].Kind != fleet.KindRejected || events[0].BrokerNode != "r1" || events[0].SessionEpoch != 1 {
		t.Fatalf("events %+v; want one rejected event for the session, the first refusal's", events)
	}
	// Another session records again; another device has its own rate.
	g.Refuse(Session{DeviceID: "gw-1", Epoch: 2}, "malformed", "not JSON")
	if !g.Admit(Session{DeviceID: "gw-2", Epoch: 1}) || len(events) != 2 {
		t.Fatalf("events %d; want a second for the new session, and gw-2 admitted", len(events))
	}
	// A second later the device may send one more; an hour of silence
	// forgets every device.
	now = now.Add(time.Second)
	if !g.Admit(s1) || g.Admit(s1) {
		t.Fatal("want exactly one more after a second")
	}
	g.ForgetIdle(now.Add(IdleAfter + time.Second))
	kept := 0
	g.sessions.Range(func(any, any) bool { kept++; return true })
	if kept != 0 {
		t.Errorf("%d devices' state kept after an hour without input", kept)
	}
}
