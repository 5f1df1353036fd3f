package e2e

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
)

// TestCanaryFailureGatePauses: a firmware whose install fails on 40 % of
// devices trips the canary's failure gate; the campaign pauses, no device
// beyond the canary gets the job, and the history shows the gate's numbers.
func TestCanaryFailureGatePauses(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	target := upload(t, api, "1.1.0", 128<<10)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:    sim.RunOptions{Duration: secs(120), Register: true, Ramp: 100},
		Cohorts: []sim.Cohort{{Name: "gw", Count: 12, Model: "gw-100", Firmware: "1.0.0",
			OTAFailure: sim.OTAFailure{Mode: "install_fails", Rate: 0.4}}},
	}
	_, stop := runFleet(t, api, f, p.Token())
	camp, err := api.CreateCampaign(ctx, firmware.Spec{
		Name: "risky 1.1.0", FirmwareID: target.ID, Selector: firmware.Selector{Models: []string{"gw-100"}},
		Stages: []firmware.Stage{
			{Name: "canary", Count: 5, Soak: firmware.Duration(time.Second), MaxFailureRate: 0.2, MaxNotBackOnline: -1},
			{Name: "rest", Percent: 100, MaxFailureRate: 0.2, MaxNotBackOnline: -1},
		},
		DeviceTimeout: firmware.Duration(30 * time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	// Wait until every device is connected and listening, so the canary is
	// dispatched at once.
	waitOnline(t, api, 12, 20*time.Second)
	if _, err := api.CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
	v := waitCampaign(t, api, camp.ID, 60*time.Second, "a pause", func(v firmware.CampaignView) bool { return v.State == firmware.StatePaused })
	if v.Stage != 0 {
		t.Fatalf("paused in stage %d, want the canary", v.Stage)
	}
	devs, err := api.CampaignDevices(ctx, camp.ID)
	if err != nil {
		t.Fatal(err)
	}
	failed := 0
	for _, d := range devs {
		if d.Stage == nil || *d.Stage != 0 {
			if d.DispatchedAt != nil || d.State != "pending" {
				t.Errorf("device %s beyond the canary got the job: %+v", d.DeviceID, d)
			}
			continue
		}
		if d.State == "failed" {
			failed++
			if !strings.Contains(d.Error, "install failed") {
				t.Errorf("%s failed with %q, want the device's reason", d.DeviceID, d.Error)
			}
		}
	}
	if failed < 2 {
		t.Errorf("%d canary failures recorded, want at least 2 of 5", failed)
	}
	hist, _ := api.CampaignHistory(ctx, camp.ID)
	var breach *firmware.HistoryEntry
	for i := range hist {
		if hist[i].Action == "gate_breached" {
			breach = &hist[i]
		}
	}
	if breach == nil {
		t.Fatalf("no gate decision in the history: %+v", hist)
	}
	var detail struct {
		Gate  firmware.GateResult
		Stats firmware.StageStats
	}
	json.Unmarshal(breach.Detail, &detail)
	if detail.Gate.Gate != "failure_rate" || detail.Gate.Threshold != 0.2 || detail.Gate.Value < 0.4 || detail.Stats.Targets != 5 {
		t.Fatalf("gate decision %s: want failure_rate ≥ 0.4 of 5 against 0.2", breach.Detail)
	}
	time.Sleep(2 * time.Second) // a paused campaign dispatches nothing more
	if s := stop(); s.Events["ota jobs"] != 5 {
		t.Fatalf("%d devices received a job, want only the 5 canaries", s.Events["ota jobs"])
	}
}

// TestTimeoutsOfflineDevicesAndBadImages: devices that never come back after
// the install time out and count as failed; a device offline when its job is
// dispatched gets it when it connects; a corrupted image fails verification
// on the device and is reported with the reason.
func TestTimeoutsOfflineDevicesAndBadImages(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	target := upload(t, api, "2.0.0", 64<<10)
	online := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:    sim.RunOptions{Duration: secs(120), Register: true, Ramp: 100},
		Cohorts: []sim.Cohort{
			{Name: "good", Count: 2, Model: "gw-100", Firmware: "1.0.0"},
			{Name: "brick", Count: 2, Model: "gw-100", Firmware: "1.0.0", OTAFailure: sim.OTAFailure{Mode: "never_returns"}},
			{Name: "corrupt", Count: 1, Model: "gw-100", Firmware: "1.0.0", OTAFailure: sim.OTAFailure{Mode: "checksum_mismatch"}},
		},
	}
	// The late devices are registered now but connect only after dispatch.
	late := &sim.Fleet{
		Server:  online.Server,
		Run:     sim.RunOptions{Duration: secs(120), Register: true, Ramp: 100},
		Cohorts: []sim.Cohort{{Name: "late", Count: 2, Model: "gw-100", Firmware: "1.0.0"}},
	}
	key, _ := api.SigningKey(ctx)
	late.OTA = sim.OTAOptions{PublicKey: key, InstallTime: secs(0.2)}
	if err := late.Validate(); err != nil {
		t.Fatal(err)
	}
	lateSim, err := sim.New(ctx, late, sim.Options{AdminToken: p.Token()})
	if err != nil {
		t.Fatal(err)
	}
	runFleet(t, api, online, p.Token())
	waitOnline(t, api, 5, 20*time.Second)
	camp, err := api.CreateCampaign(ctx, firmware.Spec{
		Name: "2.0.0 everywhere", FirmwareID: target.ID,
		Stages: []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1}},
		// Long enough for a good device's three acknowledged status reports,
		// install and reconnect on a loaded CI machine (5 s was not, once),
		// short enough for the bricks to time out within the wait below.
		DeviceTimeout: firmware.Duration(12 * time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
	// The late devices' jobs are dispatched but cannot be delivered.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		devs, _ := api.CampaignDevices(ctx, camp.ID)
		waiting := 0
		for _, d := range devs {
			if strings.HasPrefix(d.DeviceID, "late-") && d.State == "dispatched" && d.DeliveredAt == nil {
				waiting++
			}
		}
		if waiting == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("late devices' jobs not waiting for them: %+v", devs)
		}
	}
	lctx, lcancel := context.WithCancel(ctx)
	defer lcancel()
	go lateSim.Run(lctx)

	waitCampaign(t, api, camp.ID, 60*time.Second, "completion", func(v firmware.CampaignView) bool { return v.State == firmware.StateCompleted })
	devs, _ := api.CampaignDevices(ctx, camp.ID)
	for _, d := range devs {
		var want, reason string
		switch {
		case strings.HasPrefix(d.DeviceID, "good-"), strings.HasPrefix(d.DeviceID, "late-"):
			want = "succeeded"
		case strings.HasPrefix(d.DeviceID, "brick-"):
			want, reason = "timed_out", "did not come back"
		case strings.HasPrefix(d.DeviceID, "corrupt-"):
			want, reason = "failed", "sha256 mismatch"
		}
		if d.State != want || !strings.Contains(d.Error, reason) {
			t.Errorf("%s: %s %q, want %s %q", d.DeviceID, d.State, d.Error, want, reason)
		}
	}
	v, _ := api.Campaign(ctx, camp.ID)
	if c := v.Counts[0]; c.ByState["timed_out"] != 2 || c.ByState["failed"] != 1 || c.ByState["succeeded"] != 4 {
		t.Errorf("stage counts %+v", c.ByState)
	}
}

// TestDispatchIsPaced: devices_per_minute is an even schedule, so a
// campaign never sends a minute's worth of jobs at once.
func TestDispatchIsPaced(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	target := upload(t, api, "1.5.0", 16<<10)
	f := &sim.Fleet{
		Server:  sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:     sim.RunOptions{Duration: secs(120), Register: true, Ramp: 100},
		Cohorts: []sim.Cohort{{Name: "paced", Count: 8, Model: "gw-100", Firmware: "1.4.0"}},
	}
	runFleet(t, api, f, p.Token())
	waitOnline(t, api, 8, 20*time.Second)
	camp, err := api.CreateCampaign(ctx, firmware.Spec{Name: "paced", FirmwareID: target.ID,
		Stages:        []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1}},
		Pacing:        firmware.Pacing{DevicesPerMinute: 120}, // 2 a second
		DeviceTimeout: firmware.Duration(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
	waitCampaign(t, api, camp.ID, 60*time.Second, "completion", func(v firmware.CampaignView) bool { return v.State == firmware.StateCompleted })
	devs, _ := api.CampaignDevices(ctx, camp.ID)
	at := make([]time.Time, 0, len(devs))
	for _, d := range devs {
		at = append(at, *d.DispatchedAt)
	}
	slices.SortFunc(at, time.Time.Compare)
	// The k-th job is due k half-seconds after the start, and the first went
	// out within a step (200 ms) of the start: no job may go out before its
	// slot, give or take that step and 50 ms for the database's and fleetd's
	// clocks being read at slightly different moments of the step.
	for k := range at {
		if slot := at[0].Add(time.Duration(k) * 500 * time.Millisecond); at[k].Before(slot.Add(-250 * time.Millisecond)) {
			t.Errorf("job %d dispatched %s after the first, before its slot at %s", k, at[k].Sub(at[0]), slot.Sub(at[0]))
		}
	}
	if spread := at[len(at)-1].Sub(at[0]); spread > 10*time.Second {
		t.Errorf("8 jobs at 2 a second took %s to dispatch", spread)
	}
}
