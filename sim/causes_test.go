package sim_test

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// causeCase is one cohort of the fault matrix: the cause its devices must be
// diagnosed with, and the occurrence that proves it when one is enough.
type causeCase struct {
	cohort sim.Cohort
	// want is the problem code every device of the cohort must show ("" for
	// the healthy control, which must show none).
	want string
	// allowed are codes that may come with want because they are true of
	// such a device too: a device that drops every few seconds also flaps.
	allowed []string
	// proof picks, from the device's events oldest first, the event from
	// which the cause must be named within two keepalive periods; nil when
	// one occurrence does not prove it.
	proof func([]fleet.Event) (fleet.Event, bool)
}

// nth returns a proof that is the n-th event (1-based) matching pred.
func nth(n int, pred func(fleet.Event) bool) func([]fleet.Event) (fleet.Event, bool) {
	return func(evs []fleet.Event) (fleet.Event, bool) {
		seen := 0
		for _, e := range evs {
			if pred(e) {
				if seen++; seen == n {
					return e, true
				}
			}
		}
		return fleet.Event{}, false
	}
}

func disconnectWith(r fleet.Reason) func(fleet.Event) bool {
	return func(e fleet.Event) bool { return e.Kind == fleet.KindDisconnect && e.Reason == r }
}

// TestEveryCauseNamed plays a fault matrix: a healthy control and one cohort
// per cause fleetd diagnoses, all at once against one fleetd. Each device
// must be diagnosed with its cohort's cause and no wrong one (the control
// with none), and each cause that one occurrence proves must be named
// within two keepalive periods of that occurrence, measured by polling the
// diagnosis API while the fleet runs.
func TestEveryCauseNamed(t *testing.T) {
	if testing.Short() {
		t.Skip("45 s scenario")
	}
	p := fleetdtest.Start(t, fleetdtest.DataDir(t))
	p.WaitReady(15 * time.Second)
	api := client.New(p.HTTPURL, p.Token())
	ctx := context.Background()
	mqtt := p.Addr("mqtt-tcp")
	proxy := idleCutProxy(t, mqtt, 3*time.Second)

	const k = 2 // the keepalive, in seconds, of every cohort timed in keepalive periods
	flapping := fleet.ProblemFlapping
	cases := []causeCase{
		{cohort: sim.Cohort{Name: "healthy", Count: 3, Firmware: "1.2.0", Keepalive: secs(k)}},
		{cohort: sim.Cohort{Name: "healthy5", Count: 2, Firmware: "2.0.1", Protocol: "5", Keepalive: secs(k), Telemetry: secs(1)}},
		{cohort: sim.Cohort{Name: "badping", Count: 2, Firmware: "1.0.3", Keepalive: secs(k)},
			want: fleet.ProblemMalformedPings, allowed: []string{flapping},
			proof: nth(1, func(e fleet.Event) bool {
				return e.Kind == fleet.KindDisconnect && e.Reason == fleet.ReasonProtocolError && strings.HasPrefix(e.Detail, "PINGREQ")
			})},
		{cohort: sim.Cohort{Name: "mute", Count: 2, Firmware: "0.9.0", Keepalive: secs(k)},
			want: fleet.ProblemNoPings, allowed: []string{flapping},
			proof: nth(1, func(e fleet.Event) bool {
				return e.Kind == fleet.KindDisconnect && e.Reason == fleet.ReasonKeepaliveTimeout && e.Pings == 0
			})},
		{cohort: sim.Cohort{Name: "frozen", Count: 2, Firmware: "1.2.0", Keepalive: secs(k), FreezeAfter: secs(3), FreezeFor: secs(4)},
			want: fleet.ProblemStalls, allowed: []string{flapping}},
		{cohort: sim.Cohort{Name: "bloated", Count: 2, Firmware: "1.2.0", Keepalive: secs(k), OversizedEvery: secs(1)},
			want: fleet.ProblemOversizedPackets, allowed: []string{flapping},
			proof: nth(1, disconnectWith(fleet.ReasonPacketTooLarge))},
		{cohort: sim.Cohort{Name: "stormy", Count: 2, Firmware: "1.2.0", Keepalive: secs(k), FlapEvery: secs(0.2), Reconnect: "naive"},
			want: fleet.ProblemThrottled, allowed: []string{flapping},
			proof: nth(1, func(e fleet.Event) bool {
				return e.Kind == fleet.KindRefused && e.Reason == fleet.ReasonThrottled && e.Detail == fleet.DetailReconnectsTooOften
			})},
		// Two devices reconnecting under one id can together pass the per-id
		// connect limit: throttled is true of them too.
		{cohort: sim.Cohort{Name: "natclones", Count: 2, Firmware: "1.2.0", Keepalive: secs(k), DuplicateIDs: true, DuplicateFrom: "same_address"},
			want: fleet.ProblemDuplicateClientID, allowed: []string{flapping, fleet.ProblemThrottled},
			proof: nth(2, disconnectWith(fleet.ReasonSessionTakeover))},
		{cohort: sim.Cohort{Name: "clones", Count: 2, Firmware: "1.2.0", Keepalive: secs(k), DuplicateIDs: true},
			want: fleet.ProblemDuplicateClientID, allowed: []string{flapping, fleet.ProblemThrottled},
			proof: nth(2, disconnectWith(fleet.ReasonSessionTakeover))},
		{cohort: sim.Cohort{Name: "natted", Count: 2, Firmware: "1.2.0", Keepalive: secs(10), URL: "tcp://" + proxy},
			want: fleet.ProblemKeepaliveMismatch, allowed: []string{flapping}},
		{cohort: sim.Cohort{Name: "flaky", Count: 2, Firmware: "1.2.0", Keepalive: secs(4), FlapEvery: secs(3), FlapJitter: secs(3)},
			want: flapping},
		{cohort: sim.Cohort{Name: "zombie", Count: 1, Firmware: "1.2.0", Keepalive: secs(k), Decommissioned: true},
			want: fleet.ProblemDecommissionedRetrying},
		{cohort: sim.Cohort{Name: "wrongtoken", Count: 1, Firmware: "1.2.0", Keepalive: secs(k), Credentials: "bad_token"},
			want: fleet.ProblemAuthFailures},
	}
	f := &sim.Fleet{
		Server:   sim.Server{MQTT: "tcp://" + mqtt, API: p.HTTPURL},
		Run:      sim.RunOptions{Duration: secs(45), Register: true, Ramp: 100},
		Firmware: map[string]sim.FirmwareProfile{"1.0.3": {Pings: "malformed"}, "0.9.0": {Pings: "none"}},
	}
	devices := map[string]causeCase{} // device id → its case
	for _, c := range cases {
		c.cohort.Model = "gw-100"
		f.Cohorts = append(f.Cohorts, c.cohort)
		n := c.cohort.Count
		if c.cohort.DuplicateIDs {
			n /= 2
		}
		for i := range n {
			devices[c.cohort.Name+"-"+string(rune('0'+i))] = c
		}
	}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := sim.New(ctx, f, sim.Options{AdminToken: p.Token()})
	if err != nil {
		t.Fatal(err)
	}

	// While the fleet runs, note when each device's diagnosis first shows
	// each code.
	var mu sync.Mutex
	named := map[string]map[string]time.Time{}
	pollCtx, stopPolling := context.WithCancel(ctx)
	var polling sync.WaitGroup
	polling.Add(1)
	go func() {
		defer polling.Done()
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			for id, c := range devices {
				if c.proof == nil {
					continue
				}
				d, err := api.Diagnosis(pollCtx, id)
				if err != nil {
					continue
				}
				now := time.Now()
				mu.Lock()
				if named[id] == nil {
					named[id] = map[string]time.Time{}
				}
				for _, pr := range d.Problems {
					if _, ok := named[id][pr.Code]; !ok {
						named[id][pr.Code] = now
					}
				}
				mu.Unlock()
			}
			select {
			case <-pollCtx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	summary := s.Run(ctx)
	stopPolling()
	polling.Wait()
	t.Logf("fleet summary: connects %d, errors %v", summary.Connects, summary.Errors)
	waitFor(t, "every event stored", 20*time.Second, func() bool {
		unwritten, err := p.Metric("fleetd_event_oldest_unwritten_seconds")
		return err == nil && unwritten == 0
	})

	ids := make([]string, 0, len(devices))
	for id := range devices {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		c := devices[id]
		d, err := api.Diagnosis(ctx, id)
		if err != nil {
			t.Errorf("diagnosis of %s: %v", id, err)
			continue
		}
		var codes []string
		for _, pr := range d.Problems {
			codes = append(codes, pr.Code)
		}
		t.Logf("%s: %v", id, codes)
		if testing.Verbose() && c.want == fleet.ProblemKeepaliveMismatch {
			for _, e := range allEvents(t, api, id) {
				if e.Kind == fleet.KindDisconnect {
					t.Logf("  %s %s idle %d ms, longest silence %d ms, pings %d, %d ms", e.At.Format("15:04:05.000"), e.Reason, e.IdleMillis, e.MaxSilenceMillis, e.Pings, e.DurationMillis)
				}
			}
		}
		if c.want == "" {
			if len(codes) != 0 {
				t.Errorf("healthy %s has problems: %+v", id, d.Problems)
			}
			continue
		}
		if !slices.Contains(codes, c.want) {
			t.Errorf("%s: no %s in its diagnosis %+v", id, c.want, d.Problems)
		}
		for _, pr := range d.Problems {
			if pr.Code != c.want && !slices.Contains(c.allowed, pr.Code) {
				t.Errorf("%s (%s): wrong cause %s: %s (evidence %v)", id, c.want, pr.Code, pr.Cause, pr.Evidence)
			}
		}
		if c.proof == nil {
			continue
		}
		proof, ok := c.proof(allEvents(t, api, id))
		if !ok {
			t.Errorf("%s: the proving occurrence of %s never happened", id, c.want)
			continue
		}
		mu.Lock()
		at, seen := named[id][c.want]
		mu.Unlock()
		if !seen {
			t.Errorf("%s: %s was not named while the fleet ran", id, c.want)
			continue
		}
		periods := at.Sub(proof.At).Seconds() / k
		t.Logf("%s: %s named %.2f keepalive periods after the %s at %s", id, c.want, periods, proof.Reason, proof.At.Format("15:04:05.000"))
		if periods > 2 {
			t.Errorf("%s: %s named %.2f keepalive periods after its proof, want within 2", id, c.want, periods)
		}
	}
}

// allEvents returns every event of a device, oldest first.
func allEvents(t *testing.T, api *client.Client, id string) []fleet.Event {
	t.Helper()
	var out []fleet.Event
	cursor := ""
	for {
		page, err := api.Events(context.Background(), id, cursor, 500)
		if err != nil {
			t.Fatalf("events of %s: %v", id, err)
		}
		out = append(out, page.Events...)
		if page.NextCursor == "" || len(page.Events) == 0 {
			break
		}
		cursor = page.NextCursor
	}
	slices.SortFunc(out, func(a, b fleet.Event) int { return a.At.Compare(b.At) })
	return out
}
