package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
)

// TestCampaignFollowsGrowingFleet: a fleet grows while a campaign that
// follows it runs (sim cohorts with start_after, registered through the
// API when they start). The devices registered on the old version join the
// last stage and are upgraded; the ones registered on the target version
// are not touched; the campaign stays running, following, and the live
// stream carries the joins.
func TestCampaignFollowsGrowingFleet(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t), "FLEETD_CAMPAIGN_FOLLOW_INTERVAL=500ms")
	ctx := context.Background()
	target := upload(t, api, "1.1.0", 64<<10)
	joinedSeen := watchCampaignJoins(t, p.HTTPURL, p.Token())

	f := simFleet(p,
		sim.Cohort{Name: "first", Count: 4, Model: "gw-100", Firmware: "1.0.0"},
		sim.Cohort{Name: "late", Count: 3, Model: "gw-100", Firmware: "1.0.0", StartAfter: secs(6)},
		sim.Cohort{Name: "late-current", Count: 2, Model: "gw-100", Firmware: "1.1.0", StartAfter: secs(6)},
	)
	f.Run.Duration = secs(120)
	_, stop := runFleet(t, api, f, p.Token())
	waitOnline(t, api, 4, 20*time.Second)
	fleetctl := fleetctlFor(t, p)
	spec := filepath.Join(t.TempDir(), "follow.yaml")
	os.WriteFile(spec, []byte(`name: follow 1.1.0
firmware_id: `+target.ID+`
follow: true
selector: {models: [gw-100]}
stages:
  - {name: canary, count: 1, max_failure_rate: 0, max_not_back_online: -1}
  - {name: rest, percent: 100, max_failure_rate: 0, max_not_back_online: -1}
device_timeout: 30s
`), 0o644)
	var camp firmware.CampaignView
	if err := json.Unmarshal([]byte(fleetctl("-output", "json", "campaign", "create", "-f", spec)), &camp); err != nil || !camp.Follow {
		t.Fatalf("fleetctl campaign create: %+v (%v), want follow kept", camp, err)
	}
	fleetctl("campaign", "start", camp.ID)
	v := waitCampaign(t, api, camp.ID, 60*time.Second, "7 devices upgraded, 3 of them joiners", func(v firmware.CampaignView) bool {
		return v.Joined == 3 && v.FollowingSince != nil && v.Counts[1].ByState["succeeded"]+v.Counts[0].ByState["succeeded"] == 7
	})
	if v.State != firmware.StateRunning || v.Total != 4 || v.Stage != 1 {
		t.Fatalf("a following campaign: state %s total %d stage %d, want running in its last stage over the 4 devices it started with", v.State, v.Total, v.Stage)
	}
	devs, err := api.CampaignDevices(ctx, camp.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if strings.HasPrefix(d.DeviceID, "late-current-") {
			t.Errorf("%s registered on the target version got a job: %+v", d.DeviceID, d)
		}
		if strings.HasPrefix(d.DeviceID, "late-") && (d.Stage == nil || *d.Stage != 1 || d.State != "succeeded") {
			t.Errorf("joiner %s: %+v, want succeeded in the last stage", d.DeviceID, d)
		}
	}
	// watch stops once the campaign follows with every device done.
	if out := fleetctl("campaign", "watch", camp.ID); !strings.Contains(out, "follows the fleet (3 joined)") || !strings.Contains(out, "following the fleet since") {
		t.Fatalf("fleetctl campaign watch of a following campaign:\n%s", out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for joinedSeen() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("the live stream showed joined %d, want 3", joinedSeen())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if s := stop(); s.Events["ota jobs"] != 7 || s.Events["late registrations"] != 5 {
		t.Fatalf("%d devices received a job and %d registered late, want 7 and 5", s.Events["ota jobs"], s.Events["late registrations"])
	}
}

// fleetctlFor runs fleetctl against p; a failing command fails the test.
func fleetctlFor(t *testing.T, p *fleetdtest.Process) func(args ...string) string {
	bin := fleetdtest.Build(t, "fleetctl")
	return func(args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = []string{"FLEETD_URL=" + p.HTTPURL, "FLEETD_ADMIN_TOKEN_FILE=" + filepath.Join(p.DataDir, "admin-token")}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("fleetctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
}

// watchCampaignJoins reads the live stream and returns the highest joined
// count a campaign event has carried so far.
func watchCampaignJoins(t *testing.T, url, token string) func() int {
	t.Helper()
	var mu sync.Mutex
	most := 0
	streamEvents(t, url, token, "campaign", func(data []byte) {
		var v firmware.CampaignView
		if json.Unmarshal(data, &v) == nil {
			mu.Lock()
			most = max(most, v.Joined)
			mu.Unlock()
		}
	})
	return func() int { mu.Lock(); defer mu.Unlock(); return most }
}

// TestConsoleCampaignFollow: the console's campaign form creates a campaign
// that follows the fleet, and the campaign page shows the devices that
// joined, live.
func TestConsoleCampaignFollow(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t), "FLEETD_CAMPAIGN_FOLLOW_INTERVAL=500ms")
	t.Cleanup(func() {
		if !p.Exited() {
			p.Signal(syscall.SIGTERM)
			_ = p.Wait(30 * time.Second)
		}
	})
	target := upload(t, api, "2.0.0", 64<<10)
	runFleet(t, api, simFleet(p, sim.Cohort{Name: "ota", Count: 2, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(5)}), p.Token())
	waitOnline(t, api, 2, 20*time.Second)

	b := newBrowser(t, p.HTTPURL, 120*time.Second)
	b.signIn(p.Token())
	b.click(`a[data-nav=campaigns]`)
	b.click(`[data-testid=new-campaign]`)
	b.waitJS("the campaign form", `document.querySelector('[data-testid=cf-firmware] option[value="`+target.ID+`"]')`, 10*time.Second)
	b.setValue(`[data-testid=cf-name]`, "console follow")
	b.setValue(`[data-testid=cf-firmware]`, target.ID)
	b.setValue(`[data-testid=stage-mnbo]`, "0")
	b.setValue(`[data-testid=cf-dpm]`, "0")
	b.setValue(`[data-testid=cf-concurrent]`, "0")
	b.setValue(`[data-testid=cf-timeout]`, "60s")
	b.click(`[data-testid=cf-follow]`)
	b.click(`[data-testid=cf-submit]`)
	b.waitJS("the draft campaign", `document.querySelector('[data-testid=campaign-state]') && document.querySelector('[data-testid=campaign-state]').dataset.state === 'draft'`, 10*time.Second)
	b.waitJS("the follow fact", `document.querySelector('[data-testid=campaign-follow]')`, 10*time.Second)
	b.click(`[data-testid=action-start]`)
	b.click(`[data-testid=confirm-ok]`)
	b.waitJS("the campaign following", `(document.querySelector('[data-testid=campaign-follow]') || {}).textContent.includes('following since')`, 60*time.Second)

	runFleet(t, api, simFleet(p, sim.Cohort{Name: "late", Count: 1, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(5)}), p.Token())
	b.waitJS("the joiner", `(document.querySelector('[data-testid=campaign-follow]') || {}).textContent.startsWith('1 joined')`, 60*time.Second)
	b.shot("following")
	camps, err := api.Campaigns(context.Background())
	if err != nil || len(camps) != 1 || !camps[0].Follow || camps[0].State != firmware.StateRunning || camps[0].Joined != 1 {
		t.Fatalf("campaigns %+v (%v), want one running campaign that follows, 1 joined", camps, err)
	}
}
