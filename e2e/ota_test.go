package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// TestCampaignHealsIncompatibleFleet: devices on 1.0.3 send malformed
// PINGREQs, fleetd flags the firmware and marks them incompatible, and a
// campaign to 1.2.0 targeted at "compat: incompatible", in stages (canary 5,
// 50 %, 100 %), upgrades every one of them: they stop dropping and are no
// longer incompatible.
func TestCampaignHealsIncompatibleFleet(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	if _, err := api.SetPolicy(ctx, smallFleetPolicy); err != nil {
		t.Fatal(err)
	}
	target := upload(t, api, "1.2.0", 512<<10)
	f := &sim.Fleet{
		Server:   sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:      sim.RunOptions{Duration: secs(300), Register: true, Ramp: 100},
		Firmware: map[string]sim.FirmwareProfile{"1.0.3": {Pings: "malformed"}, "1.2.0": {Pings: "normal"}},
		OTA:      sim.OTAOptions{InterruptDownloads: true},
		Cohorts: []sim.Cohort{
			{Name: "old", Count: 12, Model: "gw-100", Firmware: "1.0.3", Keepalive: secs(2)},
			{Name: "fine", Count: 4, Model: "gw-100", Firmware: "1.2.0", Keepalive: secs(2), Telemetry: secs(1)},
		},
	}
	_, stop := runFleet(t, api, f, p.Token())

	// fleetd learns that 1.0.3 rejects pings.
	deadline := time.Now().Add(60 * time.Second)
	for {
		page, err := api.Devices(ctx, client.DeviceQuery{Compat: "incompatible", Limit: 100})
		if err == nil && len(page.Devices) == 12 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the 1.0.3 devices were not found incompatible: %+v (%v)", page.Devices, err)
		}
		time.Sleep(500 * time.Millisecond)
	}

	camp, err := api.CreateCampaign(ctx, firmware.Spec{
		Name: "heal 1.0.3", FirmwareID: target.ID, Selector: firmware.Selector{Compat: "incompatible"},
		Stages: []firmware.Stage{
			{Name: "canary", Count: 5, Soak: firmware.Duration(time.Second), MaxFailureRate: 0.2, MaxNotBackOnline: 1},
			{Name: "half", Percent: 50, Soak: firmware.Duration(time.Second), MaxFailureRate: 0.2, MaxNotBackOnline: 1},
			{Name: "all", Percent: 100, MaxFailureRate: 0.2, MaxNotBackOnline: 1},
		},
		Pacing:        firmware.Pacing{MaxConcurrent: 6},
		DeviceTimeout: firmware.Duration(60 * time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
	v := waitCampaign(t, api, camp.ID, 120*time.Second, "completion", func(v firmware.CampaignView) bool { return v.State == firmware.StateCompleted })
	if v.Total != 12 || v.Counts[0].Targets != 5 || v.Counts[1].Targets != 1 || v.Counts[2].Targets != 6 {
		t.Fatalf("stages: total %d, counts %+v; want 5, 1 (50%% of 12 less the canary), 6", v.Total, v.Counts)
	}
	for _, c := range v.Counts {
		if c.ByState["succeeded"] != c.Targets {
			t.Fatalf("stage %s: %+v, want every device succeeded", c.Name, c)
		}
	}
	upgradedAt := time.Now()
	time.Sleep(6 * time.Second) // three keepalive periods on the new firmware

	page, err := api.Devices(ctx, client.DeviceQuery{Model: "gw-100", Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range page.Devices {
		if d.Firmware != "1.2.0" || !d.Online {
			t.Errorf("%s: firmware %s online %v, want 1.2.0 and online", d.ID, d.Firmware, d.Online)
		}
		evs, _ := api.Events(ctx, d.ID, "", 1000)
		for _, e := range evs.Events {
			if e.At.After(upgradedAt) && e.Reason == fleet.ReasonProtocolError {
				t.Errorf("%s still drops with protocol_error after the upgrade: %+v", d.ID, e)
			}
		}
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		page, _ := api.Devices(ctx, client.DeviceQuery{Compat: "incompatible", Limit: 100})
		if len(page.Devices) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("devices still incompatible after the upgrade: %+v", page.Devices)
		}
		time.Sleep(200 * time.Millisecond)
	}
	hist, err := api.CampaignHistory(ctx, camp.ID)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, h := range hist {
		actions = append(actions, h.Action)
	}
	joined := strings.Join(actions, ",")
	for _, want := range []string{"created", "start", "stage_finished", "advance", "complete"} {
		if !strings.Contains(joined, want) {
			t.Errorf("history %s lacks %s", joined, want)
		}
	}
	if !strings.Contains(string(hist[len(hist)-1].Detail), "failure_rate") {
		t.Errorf("completion does not record the gate numbers: %s", hist[len(hist)-1].Detail)
	}
	summary := stop()
	if summary.Events["ota download resumes"] == 0 || summary.Events["ota duplicate jobs"] != 0 || summary.Events["ota jobs"] != 12 {
		t.Errorf("OTA events %v: want resumed downloads, 12 jobs, none twice", summary.Events)
	}
}
