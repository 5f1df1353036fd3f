package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
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
	camp, err := api.CreateCampaign(ctx, firmware.Spec{
		Name: "follow 1.1.0", FirmwareID: target.ID, Follow: true, Selector: firmware.Selector{Models: []string{"gw-100"}},
		Stages: []firmware.Stage{
			{Name: "canary", Count: 1, MaxFailureRate: 0, MaxNotBackOnline: -1},
			{Name: "rest", Percent: 100, MaxFailureRate: 0, MaxNotBackOnline: -1},
		},
		DeviceTimeout: firmware.Duration(30 * time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	if !camp.Follow {
		t.Fatalf("created campaign %+v: follow not kept", camp)
	}
	if _, err := api.CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
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

// watchCampaignJoins reads the live stream and returns the highest joined
// count a campaign event has carried so far.
func watchCampaignJoins(t *testing.T, url, token string) func() int {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url+"/api/v1/stream", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("live stream: %v %v", resp, err)
	}
	var mu sync.Mutex
	most := 0
	go func() {
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		event := ""
		for sc.Scan() {
			line := sc.Text()
			if name, ok := strings.CutPrefix(line, "event: "); ok {
				event = name
				continue
			}
			data, ok := strings.CutPrefix(line, "data: ")
			if !ok || event != "campaign" {
				continue
			}
			var v firmware.CampaignView
			if json.Unmarshal([]byte(data), &v) == nil {
				mu.Lock()
				most = max(most, v.Joined)
				mu.Unlock()
			}
		}
	}()
	return func() int { mu.Lock(); defer mu.Unlock(); return most }
}
