package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
)

// closedWindow is a daily hour-long window twelve hours from now (UTC),
// closed for the whole of a test.
func closedWindow() firmware.Window {
	return firmware.Window{Cron: fmt.Sprintf("0 %d * * *", (time.Now().UTC().Hour()+12)%24), Duration: firmware.Duration(time.Hour)}
}

// TestConsoleApproveStage: a campaign whose first stage requires approval
// waits after start; the console offers Approve (built from the campaign's
// actions), approving it runs the campaign, the history names the stage
// approved, and the campaign's closed window says why nothing is sent and
// until when.
func TestConsoleApproveStage(t *testing.T) {
	p, api := consoleFleetd(t)
	ctx := context.Background()
	target := upload(t, api, "2.0.0", 4<<10)
	if _, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "away-1", Model: "gw-100", Tags: []string{"tz=Asia/Tokyo"}}); err != nil {
		t.Fatal(err)
	}
	camp, err := api.CreateCampaign(ctx, firmware.Spec{Name: "approved", FirmwareID: target.ID,
		Stages:        []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1, RequiresApproval: true}},
		Windows:       []firmware.Window{closedWindow()},
		DeviceTimeout: firmware.Duration(10 * time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.CampaignAction(ctx, camp.ID, firmware.ActStart); err != nil {
		t.Fatal(err)
	}
	b := newBrowser(t, p.HTTPURL, 60*time.Second)
	b.signIn(p.Token())
	b.navigate("/ui/campaigns/" + camp.ID)
	b.waitJS("the campaign awaiting approval with Approve offered", `document.querySelector('[data-testid=campaign-state]').dataset.state === 'awaiting_approval' &&
		[...document.querySelectorAll('[data-testid=campaign-actions] button')].map((e) => e.dataset.testid).join(',') === 'action-approve,action-abort,action-rollback'`, 20*time.Second)
	b.shot("awaiting-approval")
	b.click(`[data-testid=action-approve]`)
	b.click(`[data-testid=confirm-ok]`)
	b.waitJS("the campaign running", `document.querySelector('[data-testid=campaign-state]').dataset.state === 'running'`, 10*time.Second)
	b.waitJS("the approval in the history", `(() => { const e = document.querySelector('[data-testid=history-entry][data-action=approve]');
		return e && e.textContent.includes('stage 1 "all" approved') && e.textContent.includes('break-glass@'); })()`, 10*time.Second)
	b.waitJS("the closed window and when it opens", `(() => { const e = document.querySelector('[data-testid=campaign-window]');
		return e && e.textContent.includes('closed: nothing is dispatched until'); })()`, 10*time.Second)
	b.shot("approved")

	v, err := api.Campaign(ctx, camp.ID)
	if err != nil {
		t.Fatal(err)
	}
	if v.State != firmware.StateRunning || v.Window == nil || v.Window.Open || v.Window.NextWindow.IsZero() || v.Counts[0].ByState["pending"] != 1 {
		t.Fatalf("approved campaign outside its window: state %s, window %+v, counts %+v; want running, closed, 1 pending", v.State, v.Window, v.Counts[0])
	}
}

// TestFleetctlApprove: fleetctl creates a campaign with windows and an
// approval from YAML, watch stops where the campaign awaits approval and
// says how to give it, approve runs it, and a spec with a bad window is
// refused naming the field.
func TestFleetctlApprove(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	bin := fleetdtest.Build(t, "fleetctl")
	dir := t.TempDir()
	fleetctl := func(args ...string) (string, error) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = []string{"FLEETD_URL=" + p.HTTPURL, "FLEETD_ADMIN_TOKEN_FILE=" + filepath.Join(p.DataDir, "admin-token")}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	must := func(args ...string) string {
		t.Helper()
		out, err := fleetctl(args...)
		if err != nil {
			t.Fatalf("fleetctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	target := upload(t, api, "2.0.0", 4<<10)
	if _, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "away-1", Model: "gw-100"}); err != nil {
		t.Fatal(err)
	}
	spec := func(window string) string {
		path := filepath.Join(dir, "campaign.yaml")
		os.WriteFile(path, []byte(`name: approved
firmware_id: `+target.ID+`
stages:
  - {name: all, percent: 100, max_failure_rate: 1, max_not_back_online: -1, requires_approval: true}
windows:
  - `+window+`
timezone: Europe/Paris
timezone_tag: tz
device_timeout: 10m
`), 0o644)
		return path
	}
	if out, err := fleetctl("campaign", "create", "-f", spec(`{cron: "0 * * * *", duration: 2h}`)); err == nil || !strings.Contains(out, "windows[0].duration") {
		t.Fatalf("a window longer than its period: %v\n%s", err, out)
	}
	if out, err := fleetctl("campaign", "create", "-f", spec(`{cron: "CRON_TZ=Asia/Tokyo 0 2 * * *", duration: 1h}`)); err == nil || !strings.Contains(out, "windows[0].cron") {
		t.Fatalf("a window with its own zone: %v\n%s", err, out)
	}
	w := closedWindow()
	out := must("-output", "json", "campaign", "create", "-f", spec(fmt.Sprintf(`{cron: %q, duration: 1h}`, w.Cron)))
	id := between(out, `"id": "`, `"`)
	if id == "" {
		t.Fatalf("campaign create:\n%s", out)
	}
	must("campaign", "start", id)
	if out := must("campaign", "watch", id); !strings.Contains(out, "stage 1 awaits approval: fleetctl campaign approve "+id) {
		t.Fatalf("campaign watch of a campaign awaiting approval:\n%s", out)
	}
	if out := must("campaign", "approve", id); !strings.Contains(out, "running") || !strings.Contains(out, "closed") || !strings.Contains(out, "next opens") {
		t.Fatalf("campaign approve:\n%s", out)
	}
	if out, err := fleetctl("campaign", "approve", id); err == nil || !strings.Contains(out, "409") {
		t.Fatalf("a second approval: %v\n%s", err, out)
	}
	if out := must("campaign", "history", id); !strings.Contains(out, "approve") || !strings.Contains(out, "awaiting_approval") {
		t.Fatalf("campaign history:\n%s", out)
	}
}

// between returns the text of s between the first prefix and the next
// suffix after it, or "".
func between(s, prefix, suffix string) string {
	_, rest, ok := strings.Cut(s, prefix)
	if !ok {
		return ""
	}
	v, _, _ := strings.Cut(rest, suffix)
	return v
}

// TestCampaignWindowsAPI: a campaign's windows are checked at creation, a
// 400 naming the field for each kind of mistake, and nothing is stored.
func TestCampaignWindowsAPI(t *testing.T) {
	_, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	target := upload(t, api, "2.0.0", 4<<10)
	if _, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "w-1", Model: "gw-100"}); err != nil {
		t.Fatal(err)
	}
	spec := func(edit func(*firmware.Spec)) firmware.Spec {
		s := firmware.Spec{Name: "windowed", FirmwareID: target.ID, DeviceTimeout: firmware.Duration(10 * time.Minute),
			Stages:  []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1}},
			Windows: []firmware.Window{{Cron: "0 2 * * *", Duration: firmware.Duration(4 * time.Hour)}}}
		edit(&s)
		return s
	}
	hour := firmware.Duration(time.Hour)
	for _, tt := range []struct {
		name, field string
		edit        func(*firmware.Spec)
	}{
		{"bad cron", "windows[0].cron", func(s *firmware.Spec) { s.Windows[0].Cron = "0 2 * *" }},
		{"zone in the cron", "windows[0].cron", func(s *firmware.Spec) { s.Windows[0].Cron = "TZ=UTC 0 2 * * *" }},
		{"zero duration", "windows[0].duration", func(s *firmware.Spec) { s.Windows[0].Duration = 0 }},
		{"negative duration", "windows[0].duration", func(s *firmware.Spec) { s.Windows[0].Duration = -hour }},
		{"longer than the period", "windows[1].duration", func(s *firmware.Spec) {
			s.Windows = append(s.Windows, firmware.Window{Cron: "30 * * * *", Duration: 2 * hour})
		}},
		{"unknown zone", "timezone", func(s *firmware.Spec) { s.Timezone = "Europe/Lyon" }},
		{"a tag that is no key", "timezone_tag", func(s *firmware.Spec) { s.TimezoneTag = "tz=UTC" }},
	} {
		_, err := api.CreateCampaign(ctx, spec(tt.edit))
		wantAPIError(t, err, http.StatusBadRequest, tt.field)
	}
	if camps, err := api.Campaigns(ctx); err != nil || len(camps) != 0 {
		t.Fatalf("refused campaigns left %d behind (%v)", len(camps), err)
	}
	v, err := api.CreateCampaign(ctx, spec(func(s *firmware.Spec) { s.Timezone, s.TimezoneTag = "America/New_York", "tz" }))
	if err != nil {
		t.Fatal(err)
	}
	if v.Window == nil || v.Window.Open != v.Window.NextWindow.IsZero() || len(v.Window.Zones) != 1 || v.Window.Zones[0].Zone != "America/New_York" {
		t.Fatalf("a draft's window %+v: want the campaign zone's, open or with a next opening", v.Window)
	}
}

// TestWindowsFollowZones runs fleetsim devices tagged with their time zone
// (tz=Asia/Tokyo, tz=America/New_York, and untagged ones in the campaign's
// zone, Paris) against a campaign whose window is open right now in Tokyo
// only: the Tokyo devices are upgraded, the others are not sent a job, and
// the campaign says when their window opens.
func TestWindowsFollowZones(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	target := upload(t, api, "2.0.0", 16<<10)
	runFleet(t, api, simFleet(p,
		sim.Cohort{Name: "tokyo", Count: 2, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(5), Tags: []string{"tz=Asia/Tokyo"}},
		sim.Cohort{Name: "newyork", Count: 2, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(5), Tags: []string{"tz=America/New_York"}},
		sim.Cohort{Name: "paris", Count: 2, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(5)},
	), p.Token())
	waitOnline(t, api, 6, 20*time.Second)
	tokyo, _ := firmware.LoadZone("Asia/Tokyo")
	// From the top of Tokyo's current hour for two hours: open now in Tokyo;
	// Paris (8 hours behind in winter, 7 in summer) and New York (13 or 14
	// behind) are outside it.
	window := firmware.Window{Cron: fmt.Sprintf("0 %d * * *", time.Now().In(tokyo).Hour()), Duration: firmware.Duration(2 * time.Hour)}
	camp, err := api.CreateCampaign(ctx, firmware.Spec{Name: "zones", FirmwareID: target.ID,
		Stages:  []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 0, MaxNotBackOnline: 0}},
		Windows: []firmware.Window{window}, Timezone: "Europe/Paris", TimezoneTag: "tz",
		DeviceTimeout: firmware.Duration(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.CampaignAction(ctx, camp.ID, firmware.ActStart); err != nil {
		t.Fatal(err)
	}
	states := func() map[string]string {
		ds, err := api.CampaignDevices(ctx, camp.ID)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, d := range ds {
			out[d.DeviceID] = d.State
		}
		return out
	}
	deadline := time.Now().Add(60 * time.Second)
	for s := states(); s["tokyo-0"] != "succeeded" || s["tokyo-1"] != "succeeded"; s = states() {
		if time.Now().After(deadline) {
			t.Fatalf("the Tokyo devices were not upgraded inside Tokyo's window: %v", s)
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second) // a few more campaign steps (every 200 ms): still nothing for the others
	s := states()
	for _, id := range []string{"newyork-0", "newyork-1", "paris-0", "paris-1"} {
		if s[id] != "pending" {
			t.Errorf("%s, outside its window: %s, want pending", id, s[id])
		}
	}
	v, err := api.Campaign(ctx, camp.ID)
	if err != nil {
		t.Fatal(err)
	}
	if v.State != firmware.StateRunning || v.Window == nil || v.Window.Open || v.Window.NextWindow.Before(time.Now()) || len(v.Window.Zones) != 2 {
		t.Fatalf("with the Tokyo devices done: state %s, window %+v; want running, closed for Paris and New York, with the next opening", v.State, v.Window)
	}
}
