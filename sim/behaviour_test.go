package sim_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func secs(s float64) sim.Duration { return sim.Duration(s * float64(time.Second)) }

func events(t *testing.T, api *client.Client, id string) []fleet.Event {
	t.Helper()
	page, err := api.Events(context.Background(), id, "", 1000)
	if err != nil {
		t.Fatalf("events of %s: %v", id, err)
	}
	return page.Events
}

func count(evs []fleet.Event, pred func(fleet.Event) bool) int {
	n := 0
	for _, e := range evs {
		if pred(e) {
			n++
		}
	}
	return n
}

func disconnects(reason fleet.Reason) func(fleet.Event) bool {
	return func(e fleet.Event) bool { return e.Kind == fleet.KindDisconnect && e.Reason == reason }
}

// TestBehavioursReachTheBroker plays one cohort per behaviour against a real
// fleetd and checks that each shows up in the registry as the failure it
// imitates.
func TestBehavioursReachTheBroker(t *testing.T) {
	p := fleetdtest.Start(t, fleetdtest.DataDir(t))
	p.WaitReady(15 * time.Second)
	api := client.New(p.HTTPURL, p.Token())
	f := &sim.Fleet{
		Server:   sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:      sim.RunOptions{Duration: secs(9), Ramp: 100, Register: true},
		Firmware: map[string]sim.FirmwareProfile{"1.0.3": {Pings: "malformed"}},
		Cohorts: []sim.Cohort{
			{Name: "healthy", Count: 3, Model: "gw-100", Firmware: "1.2.0", Protocol: "3.1.1", Telemetry: secs(1)},
			{Name: "healthy5", Count: 2, Model: "gw-200", Firmware: "2.0.1", Protocol: "5", Telemetry: secs(1)},
			{Name: "old31", Count: 1, Model: "gw-100", Firmware: "1.2.0", Protocol: "3.1"},
			// Keepalive 2 s, not 1: mochi's deadline is 1 + 1/2 = 1 s in integer
			// maths, which races the client's first ping at 1 s.
			{Name: "buggy", Count: 2, Model: "gw-100", Firmware: "1.0.3", Keepalive: secs(2)},
			{Name: "buggy5", Count: 1, Model: "gw-100", Firmware: "1.0.3", Protocol: "5", Keepalive: secs(2)},
			{Name: "mute", Count: 1, Model: "gw-100", Pings: "none", Keepalive: secs(2)},
			{Name: "mute5", Count: 1, Model: "gw-100", Pings: "none", Protocol: "5", Keepalive: secs(2)},
			{Name: "frozen", Count: 1, Model: "gw-100", Keepalive: secs(2), FreezeAfter: secs(0.5), FreezeFor: secs(5)},
			{Name: "twins", Count: 2, Model: "gw-100", DuplicateIDs: true},
			{Name: "flappy", Count: 1, Model: "gw-100", FlapEvery: secs(1)},
			{Name: "wrong", Count: 1, Model: "gw-100", Credentials: "bad_token"},
		},
	}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := sim.New(context.Background(), f, sim.Options{AdminToken: p.Token()})
	if err != nil {
		t.Fatal(err)
	}
	summary := s.Run(context.Background())
	t.Logf("summary: %+v", summary)

	for _, tc := range []struct {
		id       string
		protocol fleet.Protocol
		firmware string
	}{{"healthy-0", 4, "1.2.0"}, {"healthy5-1", 5, "2.0.1"}, {"old31-0", 3, "1.2.0"}} {
		var d fleet.Device
		var err error
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if d, err = api.Device(context.Background(), tc.id); err == nil && !d.Online {
				break
			}
		}
		if err != nil || d.ProtocolVersion != tc.protocol || d.Firmware != tc.firmware || d.LastDisconnect != fleet.ReasonClientDisconnect {
			t.Errorf("%s: %+v (%v); want protocol %s, firmware %s, ended by its own DISCONNECT", tc.id, d, err, tc.protocol, tc.firmware)
		}
		if n := count(events(t, api, tc.id), func(e fleet.Event) bool {
			return e.Kind == fleet.KindDisconnect && e.Reason != fleet.ReasonClientDisconnect
		}); n != 0 {
			t.Errorf("%s: %d unexpected disconnects: %+v", tc.id, n, events(t, api, tc.id))
		}
	}
	for _, id := range []string{"buggy-0", "buggy-1", "buggy5-0"} {
		evs := events(t, api, id)
		if count(evs, func(e fleet.Event) bool {
			return e.Kind == fleet.KindDisconnect && e.Reason == fleet.ReasonProtocolError && e.Detail == "PINGREQ with reserved flags 0x2"
		}) == 0 {
			t.Errorf("%s: no protocol_error naming the PINGREQ: %+v", id, evs)
		}
	}
	for _, id := range []string{"mute-0", "mute5-0"} {
		evs := events(t, api, id)
		if count(evs, func(e fleet.Event) bool { return disconnects(fleet.ReasonKeepaliveTimeout)(e) && e.Pings == 0 }) == 0 {
			t.Errorf("%s: no keepalive_timeout without pings: %+v", id, evs)
		}
	}
	if evs := events(t, api, "frozen-0"); count(evs, disconnects(fleet.ReasonKeepaliveTimeout)) == 0 {
		t.Errorf("frozen-0: no keepalive_timeout: %+v", evs)
	}
	twins := events(t, api, "twins-0")
	if count(twins, disconnects(fleet.ReasonSessionTakeover)) == 0 {
		t.Errorf("twins-0: no session_takeover: %+v", twins)
	}
	ips := map[string]bool{}
	for _, e := range twins {
		if e.Kind == fleet.KindConnect {
			host, _, _ := net.SplitHostPort(e.RemoteAddr)
			ips[host] = true
		}
	}
	if len(ips) < 2 {
		t.Errorf("twins-0 connected from %v, want two addresses", ips)
	}
	if evs := events(t, api, "flappy-0"); count(evs, disconnects(fleet.ReasonConnectionLost)) < 3 {
		t.Errorf("flappy-0: fewer than 3 connection_lost: %+v", evs)
	}
	if evs := events(t, api, "wrong-0"); count(evs, func(e fleet.Event) bool {
		return e.Kind == fleet.KindRefused && e.Reason == fleet.ReasonAuthFailed && e.Detail == "wrong token"
	}) == 0 {
		t.Errorf("wrong-0: no auth_failed: %+v", evs)
	}
	refused := 0
	for kind, n := range summary.Errors {
		if strings.HasPrefix(kind, "refused") {
			refused += int(n)
		}
	}
	if summary.Connects == 0 || summary.MessagesSent == 0 || refused == 0 || summary.ConnectLatencyMS.P50 <= 0 {
		t.Errorf("summary does not add up: %+v", summary)
	}
}
