package e2e

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// TestCampaignSurvivesKill9: fleetd is killed with SIGKILL in the middle of
// a stage and started again on the same data; the campaign completes and no
// device receives its job twice.
func TestCampaignSurvivesKill9(t *testing.T) {
	dir := fleetdtest.DataDir(t)
	ports := []string{"FLEETD_HTTP_ADDR=" + freePort(t), "FLEETD_MQTT_ADDR=" + freePort(t)}
	p, api := fastFleetd(t, dir, ports...)
	ctx := context.Background()
	target := upload(t, api, "3.0.0", 256<<10)
	f := &sim.Fleet{
		Server:  sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:     sim.RunOptions{Duration: secs(300), Register: true, Ramp: 100},
		OTA:     sim.OTAOptions{InstallTime: secs(0.5)},
		Cohorts: []sim.Cohort{{Name: "gw", Count: 16, Model: "gw-100", Firmware: "2.0.0"}},
	}
	_, stop := runFleet(t, api, f, p.Token())
	waitOnline(t, api, 16, 20*time.Second)
	camp, err := api.CreateCampaign(ctx, firmware.Spec{
		Name: "3.0.0", FirmwareID: target.ID,
		Stages: []firmware.Stage{
			{Name: "canary", Count: 2, MaxFailureRate: 0.5, MaxNotBackOnline: -1},
			{Name: "all", Percent: 100, MaxFailureRate: 0.5, MaxNotBackOnline: -1},
		},
		Pacing:        firmware.Pacing{MaxConcurrent: 2},
		DeviceTimeout: firmware.Duration(60 * time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
	waitCampaign(t, api, camp.ID, 60*time.Second, "the second stage under way", func(v firmware.CampaignView) bool {
		return v.Stage == 1 && len(v.Counts) == 2 && v.Counts[1].ByState["succeeded"] >= 2
	})
	p.Kill()

	p2 := fleetdtest.Start(t, dir, append([]string{"FLEETD_ANALYSIS_INTERVAL=1s", "FLEETD_CAMPAIGN_INTERVAL=200ms"}, ports...)...)
	p2.WaitReady(20 * time.Second)
	api2 := client.New(p2.HTTPURL, p2.Token())
	v := waitCampaign(t, api2, camp.ID, 120*time.Second, "completion after the restart", func(v firmware.CampaignView) bool {
		return v.State == firmware.StateCompleted
	})
	for _, c := range v.Counts {
		if c.ByState["succeeded"] != c.Targets {
			t.Errorf("stage %s: %+v, want every device upgraded", c.Name, c.ByState)
		}
	}
	summary := stop()
	if summary.Events["ota duplicate jobs"] != 0 || summary.Events["ota jobs"] != 16 {
		t.Fatalf("OTA events %v: want 16 jobs received, none twice", summary.Events)
	}
	p2.Signal(syscall.SIGTERM)
	if err := p2.Wait(15 * time.Second); err != nil {
		t.Fatalf("fleetd exit: %v", err)
	}
}
