package sim_test

import (
	"context"
	"net"
	"slices"
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

// TestDropCausesReachTheBroker plays one cohort per drop cause that the
// simulator added after the first set (jittered flapping, clones behind one
// NAT, oversized packets, a decommissioned device that keeps trying, a naive
// reconnect storm) against a real fleetd with its default limits, and checks
// that each is recorded as the cause fleetd diagnoses.
func TestDropCausesReachTheBroker(t *testing.T) {
	p := fleetdtest.Start(t, fleetdtest.DataDir(t))
	p.WaitReady(15 * time.Second)
	api := client.New(p.HTTPURL, p.Token())
	// Reconnecting at once, the jittery device starts about 13 sessions in
	// the run: flapping, and still under fleetd's per-id connect limit (1/s,
	// burst 10).
	jittery := sim.Cohort{Name: "jittery", Count: 1, Model: "gw-100", FlapEvery: secs(0.3), FlapJitter: secs(0.6), Reconnect: "naive"}
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		// The storm's refused retries come every 10 ms: a ramp well above
		// that keeps them from starving the other cohorts' reconnects.
		Run: sim.RunOptions{Duration: secs(8), Ramp: 1000, Register: true},
		Cohorts: []sim.Cohort{
			jittery,
			{Name: "nat", Count: 2, Model: "gw-100", DuplicateIDs: true, DuplicateFrom: "same_address"},
			{Name: "chatty", Count: 1, Model: "gw-100", OversizedEvery: secs(0.3)},
			{Name: "chatty5", Count: 1, Model: "gw-200", Protocol: "5", OversizedEvery: secs(0.3)},
			{Name: "zombie", Count: 1, Model: "gw-100", Decommissioned: true},
			// fleetd admits 1 connect per second per device id, burst 10: a
			// device reconnecting at once after 0.2 s sessions is over it
			// within about two seconds.
			{Name: "storm", Count: 1, Model: "gw-100", FlapEvery: secs(0.2), Reconnect: "naive"},
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
	// Wait for the last events to be written: every device's final session
	// (or refusal) ends with the run.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if d, err := api.Device(context.Background(), "chatty5-0"); err == nil && !d.Online {
			break
		}
	}

	// Jitter: each dropped session lasts what the device's seeded source drew
	// for it, so the broker's durations follow the schedule, not one period.
	evs := events(t, api, "jittery-0")
	epochs := []int64{}
	for _, e := range evs {
		if e.Kind == fleet.KindConnect {
			epochs = append(epochs, e.SessionEpoch)
		}
	}
	slices.Sort(epochs)
	schedule := sim.FlapSchedule(f.Cohorts[0], "jittery-0", len(epochs))
	matched, distinct := 0, map[int64]bool{}
	for _, e := range evs {
		if !disconnects(fleet.ReasonConnectionLost)(e) {
			continue
		}
		i := slices.Index(epochs, e.SessionEpoch)
		if i < 0 {
			continue
		}
		// The broker's clock runs from its CONNECT to the drop, the device's
		// from its CONNACK: a loaded machine (CI runs packages in parallel,
		// under -race) stretches the gap, so the bound is generous late and
		// tight early.
		want := schedule[i]
		got := time.Duration(e.DurationMillis) * time.Millisecond
		if got < want-50*time.Millisecond || got > want+time.Second {
			t.Errorf("jittery-0 session %d lasted %s, want the scheduled %s", i, got, want)
		}
		if got < jittery.FlapEvery.D()-50*time.Millisecond || got > (jittery.FlapEvery+jittery.FlapJitter).D()+time.Second {
			t.Errorf("jittery-0 session %d lasted %s, outside flap_every + [0, flap_jitter)", i, got)
		}
		matched++
		distinct[e.DurationMillis/50] = true
	}
	t.Logf("jittery-0: %d dropped sessions followed the schedule %v", matched, schedule)
	if matched < 3 || len(distinct) < 2 {
		t.Errorf("jittery-0: %d dropped sessions checked, %d distinct lengths; want at least 3 and 2: %+v", matched, len(distinct), evs)
	}

	// Clones behind one NAT: takeovers, every connect from one address on
	// more than one port.
	nat := events(t, api, "nat-0")
	if count(nat, disconnects(fleet.ReasonSessionTakeover)) == 0 {
		t.Errorf("nat-0: no session_takeover: %+v", nat)
	}
	ips, ports := map[string]bool{}, map[string]bool{}
	for _, e := range nat {
		if e.Kind == fleet.KindConnect {
			host, port, _ := net.SplitHostPort(e.RemoteAddr)
			ips[host], ports[port] = true, true
		}
	}
	if len(ips) != 1 || len(ports) < 2 {
		t.Errorf("nat-0 connected from addresses %v, ports %v; want one address, several ports", ips, ports)
	}

	// Oversized packets: the broker ends the session, the device comes back.
	for _, id := range []string{"chatty-0", "chatty5-0"} {
		if evs := events(t, api, id); count(evs, disconnects(fleet.ReasonPacketTooLarge)) < 2 {
			t.Errorf("%s: fewer than 2 packet_too_large: %+v", id, evs)
		}
	}

	// The zombie: decommissioned, refused as such every time it tries, never
	// connected.
	if d, err := api.Device(context.Background(), "zombie-0"); err != nil || d.State != fleet.StateDecommissioned {
		t.Errorf("zombie-0: %+v (%v); want decommissioned", d, err)
	}
	zombie := events(t, api, "zombie-0")
	if n := count(zombie, func(e fleet.Event) bool {
		return e.Kind == fleet.KindRefused && e.Reason == fleet.ReasonDecommissioned
	}); n < 2 || count(zombie, func(e fleet.Event) bool { return e.Kind == fleet.KindConnect }) != 0 {
		t.Errorf("zombie-0: %d decommissioned refusals, want at least 2 and no connect: %+v", n, zombie)
	}

	// The storm: fleetd's per-id connect limit refuses it.
	storm := events(t, api, "storm-0")
	if count(storm, func(e fleet.Event) bool {
		return e.Kind == fleet.KindRefused && e.Reason == fleet.ReasonThrottled && e.Detail == fleet.DetailReconnectsTooOften
	}) == 0 {
		t.Errorf("storm-0: no throttled refusal: %d events, newest %+v", len(storm), storm[:min(len(storm), 5)])
	}

	// And fleetd's diagnosis names each cause.
	for _, tc := range []struct{ id, problem string }{
		{"jittery-0", fleet.ProblemFlapping},
		{"nat-0", fleet.ProblemDuplicateClientID},
		{"chatty-0", fleet.ProblemOversizedPackets},
		{"chatty5-0", fleet.ProblemOversizedPackets},
		{"zombie-0", fleet.ProblemDecommissionedRetrying},
		{"storm-0", fleet.ProblemThrottled},
	} {
		diag, err := api.Diagnosis(context.Background(), tc.id)
		if err != nil {
			t.Errorf("diagnosis of %s: %v", tc.id, err)
			continue
		}
		if !slices.ContainsFunc(diag.Problems, func(p fleet.Problem) bool { return p.Code == tc.problem }) {
			t.Errorf("%s: diagnosis %+v does not name %s", tc.id, diag.Problems, tc.problem)
		}
	}
	if summary.Events["oversized"] < 4 || summary.Events["flaps"] == 0 {
		t.Errorf("summary events do not add up: %+v", summary.Events)
	}
}
