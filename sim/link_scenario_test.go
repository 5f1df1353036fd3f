package sim_test

import (
	"context"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// TestLinkCausesNamed plays a fleet whose drops come from the radio link:
// healthy devices on two channels, a weak-signal cohort, a congested channel
// (two access points whose devices all drop), a bad access point on a
// healthy channel, and devices that drop on every roam. Each affected device
// must be diagnosed with its link cause, the healthy ones with none, and the
// fleet's link view must flag exactly the congested channel and the bad
// access point and say the link dominates.
func TestLinkCausesNamed(t *testing.T) {
	if testing.Short() {
		t.Skip("45 s scenario")
	}
	p := fleetdtest.Start(t, fleetdtest.DataDir(t))
	p.WaitReady(15 * time.Second)
	api := client.New(p.HTTPURL, p.Token())
	ctx := context.Background()

	// A 45 s run holds minutes of device-hours, not the production
	// minimum of half an hour per channel or access point.
	pol, err := api.Policy(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pol.Link.MinGroupDeviceHours = 0.001
	if _, err := api.SetPolicy(ctx, pol); err != nil {
		t.Fatal(err)
	}

	const (
		a1, a2 = "02:00:00:00:0a:01", "02:00:00:00:0a:02" // channel 1
		b1, b2 = "02:00:00:00:0b:01", "02:00:00:00:0b:02" // channel 11; b2 is bad
		c1, c2 = "02:00:00:00:0c:01", "02:00:00:00:0c:02" // channel 6, congested
	)
	link := func(rssi float64, ch int, bssids ...string) *sim.Link {
		return &sim.Link{RSSI: rssi, Spread: 2, Channel: ch, BSSIDs: bssids}
	}
	weak := link(-81, 1, a1, a2)
	weak.Spread, weak.DropBelow, weak.DropChance = 3, -76, 0.3
	congested := link(-58, 6, c1, c2)
	congested.DropsPerHour = 600
	bad := link(-58, 11, b2)
	bad.DropsPerHour = 600
	roamer := link(-58, 1, a1, a2)
	roamer.RoamEvery, roamer.DropOnRoam = secs(4), true
	flapping := fleet.ProblemFlapping
	cases := []struct {
		cohort  sim.Cohort
		want    string
		allowed []string
	}{
		{cohort: sim.Cohort{Name: "near", Count: 4, Link: link(-55, 1, a1, a2)}},
		{cohort: sim.Cohort{Name: "far", Count: 4, Link: link(-62, 11, b1)}},
		{cohort: sim.Cohort{Name: "weak", Count: 3, Link: weak}, want: fleet.ProblemWeakSignal, allowed: []string{flapping}},
		{cohort: sim.Cohort{Name: "crowded", Count: 4, Link: congested}, want: fleet.ProblemCongestedChannel, allowed: []string{flapping}},
		{cohort: sim.Cohort{Name: "badap", Count: 3, Link: bad}, want: fleet.ProblemBadAccessPoint, allowed: []string{flapping}},
		{cohort: sim.Cohort{Name: "roamer", Count: 2, Link: roamer}, want: fleet.ProblemRoamingDrops, allowed: []string{flapping}},
	}
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:    sim.RunOptions{Duration: secs(45), Register: true, Ramp: 100},
	}
	want := map[string]int{} // device id → its case
	for i, c := range cases {
		c.cohort.Model, c.cohort.Firmware, c.cohort.Keepalive, c.cohort.Telemetry = "gw-100", "1.2.0", secs(5), secs(1)
		f.Cohorts = append(f.Cohorts, c.cohort)
		for j := range c.cohort.Count {
			want[c.cohort.Name+"-"+string(rune('0'+j))] = i
		}
	}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := sim.New(ctx, f, sim.Options{AdminToken: p.Token()})
	if err != nil {
		t.Fatal(err)
	}
	summary := s.Run(ctx)
	t.Logf("fleet summary: connects %d, errors %v", summary.Connects, summary.Errors)
	waitFor(t, "every event stored", 20*time.Second, func() bool {
		unwritten, err := p.Metric("fleetd_event_oldest_unwritten_seconds")
		return err == nil && unwritten == 0
	})

	st, err := api.FleetLinks(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var chans []int
	var aps []string
	for _, c := range st.Channels {
		t.Logf("channel %d: %d lost over %.3f device-hours (%.0f/h, ratio %.1f, %d access points) congested=%v",
			c.Channel, c.Disconnects, c.DeviceHours, c.PerDeviceHour, c.Ratio, c.AccessPoints, c.Congested)
		if c.Congested {
			chans = append(chans, c.Channel)
		}
	}
	for _, a := range st.AccessPoints {
		t.Logf("access point %s (channel %d): %d lost over %.3f device-hours (%.0f/h, ratio %.1f) bad=%v",
			a.BSSID, a.Channel, a.Disconnects, a.DeviceHours, a.PerDeviceHour, a.Ratio, a.Bad)
		if a.Bad {
			aps = append(aps, a.BSSID)
		}
	}
	t.Logf("causes %v, dominant %s", st.Causes, st.Dominant)
	if !slices.Equal(chans, []int{6}) {
		t.Errorf("congested channels %v, want [6]", chans)
	}
	if !slices.Equal(aps, []string{b2}) {
		t.Errorf("bad access points %v, want [%s]", aps, b2)
	}
	if st.Dominant != "link" {
		t.Errorf("dominant %q, want link", st.Dominant)
	}

	ids := make([]string, 0, len(want))
	for id := range want {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		c := cases[want[id]]
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
	}
}
