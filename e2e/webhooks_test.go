package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/notify"
	"github.com/fleetd/fleetd/sim"
)

// TestWebhookOnGatePause: a gate pausing a campaign reaches a webhook
// receiver as a signed campaign.paused_by_gate notification within 5 s; the
// receiver's first answer is a 500, fleetd retries, and the subscription's
// delivery log shows both attempts.
func TestWebhookOnGatePause(t *testing.T) {
	type hit struct {
		at     time.Time
		header http.Header
		body   []byte
	}
	var mu sync.Mutex
	var hits []hit
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		hits = append(hits, hit{time.Now(), r.Header.Clone(), body})
		first := len(hits) == 1
		mu.Unlock()
		if first {
			http.Error(w, "receiver down", http.StatusInternalServerError)
		}
	}))
	defer srv.Close()
	got := func() []hit {
		mu.Lock()
		defer mu.Unlock()
		return append([]hit(nil), hits...)
	}

	p, api := fastFleetd(t, fleetdtest.DataDir(t), "FLEETD_WEBHOOK_RETRY_MIN=500ms", "FLEETD_WEBHOOK_RETRY_MAX=1s")
	ctx := context.Background()
	sub, err := api.CreateWebhook(ctx, notify.Spec{URL: srv.URL + "/fleetd", Events: []notify.Type{notify.CampaignPausedByGate}, Description: "on-call"})
	if err != nil {
		t.Fatal(err)
	}
	target := upload(t, api, "1.1.0", 64<<10)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:    sim.RunOptions{Duration: secs(120), Register: true, Ramp: 100},
		Cohorts: []sim.Cohort{{Name: "gw", Count: 8, Model: "gw-100", Firmware: "1.0.0",
			OTAFailure: sim.OTAFailure{Mode: "install_fails", Rate: 0.6}}},
	}
	runFleet(t, api, f, p.Token())
	camp, err := api.CreateCampaign(ctx, firmware.Spec{
		Name: "risky 1.1.0", FirmwareID: target.ID, Selector: firmware.Selector{Models: []string{"gw-100"}},
		Stages: []firmware.Stage{
			{Name: "canary", Count: 5, MaxFailureRate: 0.2, MaxNotBackOnline: -1},
			{Name: "rest", Percent: 100, MaxFailureRate: 0.2, MaxNotBackOnline: -1},
		},
		DeviceTimeout: firmware.Duration(30 * time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	waitOnline(t, api, 8, 20*time.Second)
	if _, err := api.CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
	waitCampaign(t, api, camp.ID, 60*time.Second, "a pause", func(v firmware.CampaignView) bool { return v.State == firmware.StatePaused })
	hist, err := api.CampaignHistory(ctx, camp.ID)
	if err != nil {
		t.Fatal(err)
	}
	var pausedAt time.Time
	for _, h := range hist {
		if h.Action == "gate_breached" {
			pausedAt = h.At
		}
	}
	if pausedAt.IsZero() {
		t.Fatalf("no gate decision in the history: %+v", hist)
	}
	deadline := time.Now().Add(15 * time.Second)
	for len(got()) < 2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	hs := got()
	if len(hs) != 2 {
		t.Fatalf("receiver got %d requests, want the 500 and its retry", len(hs))
	}
	if lag := hs[0].at.Sub(pausedAt); lag > 5*time.Second {
		t.Errorf("first attempt %s after the pause, want within 5 s", lag)
	}
	for i, h := range hs {
		if err := notify.Verify(sub.Secret, h.header.Get(notify.HeaderSignature), h.body, time.Minute, time.Now()); err != nil {
			t.Errorf("attempt %d: %v", i+1, err)
		}
		var b notify.Body
		if err := json.Unmarshal(h.body, &b); err != nil || b.Type != notify.CampaignPausedByGate {
			t.Fatalf("attempt %d body %s: %v", i+1, h.body, err)
		}
		var data struct {
			CampaignID string `json:"campaign_id"`
			State      string `json:"state"`
			Gate       struct {
				Gate string `json:"gate"`
			} `json:"gate"`
		}
		json.Unmarshal(b.Data, &data)
		if data.CampaignID != camp.ID || data.State != "paused" || data.Gate.Gate != "failure_rate" {
			t.Errorf("attempt %d data %s", i+1, b.Data)
		}
	}
	// The log is written after the answer: wait for the second outcome.
	var log []notify.Delivery
	for time.Now().Before(deadline) {
		if log, err = api.WebhookDeliveries(ctx, sub.ID, 0, 0); err != nil {
			t.Fatal(err)
		}
		if len(log) == 1 && log[0].State == "delivered" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(log) != 1 || log[0].State != "delivered" || len(log[0].Log) != 2 || log[0].Log[0].Status != 500 || log[0].Log[1].Status != 200 {
		t.Fatalf("delivery log %+v, want one delivery with a 500 then a 200", log)
	}
}
