package sim_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fix"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// TestKeepaliveFixClearsTheCut (#18): devices behind a path that cuts idle
// connections at 4 s, on a keepalive of 10 s, are diagnosed
// keepalive_mismatch with a remedy; one API call applies it to them (a
// healthy device in the request is left alone); they take the new
// keepalive at their next connect, their sessions then outlive the cut, and
// the diagnosis reports the problem cleared.
func TestKeepaliveFixClearsTheCut(t *testing.T) {
	if testing.Short() {
		t.Skip("40 s scenario")
	}
	p := fleetdtest.Start(t, fleetdtest.DataDir(t))
	p.WaitReady(15 * time.Second)
	api := client.New(p.HTTPURL, p.Token())
	ctx := context.Background()
	mqtt := p.Addr("mqtt-tcp")
	proxy := idleCutProxy(t, mqtt, 4*time.Second)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + mqtt, API: p.HTTPURL},
		Run:    sim.RunOptions{Duration: secs(90), Register: true, Ramp: 100},
		Cohorts: []sim.Cohort{
			{Name: "natted", Count: 2, Model: "gw-100", Firmware: "1.2.0", Keepalive: secs(10), URL: "tcp://" + proxy},
			{Name: "healthy", Count: 1, Model: "gw-100", Firmware: "1.2.0", Keepalive: secs(10)},
		},
	}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := sim.New(ctx, f, sim.Options{AdminToken: p.Token()})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); s.Run(runCtx) }()
	t.Cleanup(func() { stop(); <-done })

	natted := []string{"natted-0", "natted-1"}
	problem := func(id string) *fleet.Problem {
		d, err := api.Diagnosis(ctx, id)
		if err != nil {
			return nil
		}
		i := slices.IndexFunc(d.Problems, func(p fleet.Problem) bool { return p.Code == fleet.ProblemKeepaliveMismatch })
		if i < 0 {
			return nil
		}
		return &d.Problems[i]
	}
	for _, id := range natted {
		waitFor(t, id+" diagnosed keepalive_mismatch", 40*time.Second, func() bool { return problem(id) != nil })
		pr := problem(id)
		if pr.Remedy == nil || pr.Remedy.Config[fleet.ConfigKeepalive] != float64(2) || pr.Cleared != "" {
			t.Fatalf("%s: %+v; want a remedy of keepalive_s 2 (half the 4 s cut), not cleared", id, pr)
		}
	}

	res, err := api.ApplyFix(ctx, fix.Request{Problem: fleet.ProblemKeepaliveMismatch, Devices: append(natted, "healthy-0")})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("fix: %+v", res)
	if res.Applied != 2 || res.Skipped != 1 || res.Devices[2].Skipped == "" {
		t.Fatalf("fix applied to %d, skipped %d: %+v; want the two natted devices fixed and healthy-0 left alone", res.Applied, res.Skipped, res.Devices)
	}
	for _, id := range natted {
		waitFor(t, id+" reconnected with a keepalive of 2 s", 20*time.Second, func() bool {
			d, err := api.Device(ctx, id)
			return err == nil && d.Online && d.KeepaliveRequested == 2
		})
		// Three cuts' worth of a session on the new keepalive.
		waitFor(t, id+"'s keepalive_mismatch cleared", 30*time.Second, func() bool {
			pr := problem(id)
			return pr != nil && pr.Cleared != ""
		})
		t.Logf("%s: %s", id, problem(id).Cleared)
	}
	// A cleared problem is not fixed again.
	res, err = api.ApplyFix(ctx, fix.Request{Problem: fleet.ProblemKeepaliveMismatch, Devices: natted})
	if err != nil || res.Applied != 0 {
		t.Errorf("second fix: %+v, %v; want nothing applied to cleared problems", res, err)
	}
}
