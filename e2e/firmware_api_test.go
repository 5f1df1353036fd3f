package e2e

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

func wantAPIError(t *testing.T, err error, status int, field string) {
	t.Helper()
	var e *client.Error
	if !errors.As(err, &e) || e.Status != status || (field != "" && e.Field != field) {
		t.Fatalf("got %v, want HTTP %d naming %q", err, status, field)
	}
}

// TestRollback: a completed campaign rolls its devices back to the firmware
// each ran before.
func TestRollback(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	upload(t, api, "1.0.0", 64<<10) // the version to go back to
	target := upload(t, api, "1.1.0", 64<<10)
	f := &sim.Fleet{
		Server:  sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:     sim.RunOptions{Duration: secs(120), Register: true, Ramp: 100},
		Cohorts: []sim.Cohort{{Name: "gw", Count: 4, Model: "gw-100", Firmware: "1.0.0"}},
	}
	runFleet(t, api, f, p.Token())
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		page, _ := api.Devices(ctx, client.DeviceQuery{Firmware: "1.0.0"})
		if len(page.Devices) == 4 {
			break // every device has announced the version it would go back to
		}
		if time.Now().After(deadline) {
			t.Fatal("devices never announced their firmware")
		}
	}
	camp, err := api.CreateCampaign(ctx, firmware.Spec{Name: "1.1.0", FirmwareID: target.ID,
		Stages: []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 0.5, MaxNotBackOnline: -1}}, DeviceTimeout: firmware.Duration(30 * time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	api.CampaignAction(ctx, camp.ID, "start")
	waitCampaign(t, api, camp.ID, 60*time.Second, "completion", func(v firmware.CampaignView) bool { return v.State == firmware.StateCompleted })
	_, err = api.CampaignAction(ctx, camp.ID, "resume")
	wantAPIError(t, err, http.StatusConflict, "")
	if _, err := api.CampaignAction(ctx, camp.ID, "rollback"); err != nil {
		t.Fatal(err)
	}
	v := waitCampaign(t, api, camp.ID, 60*time.Second, "rolled back", func(v firmware.CampaignView) bool { return v.State == firmware.StateRolledBack })
	if v.Rollback == nil || v.Rollback.ByState["succeeded"] != 4 {
		t.Fatalf("rollback counts %+v", v.Rollback)
	}
	page, _ := api.Devices(ctx, client.DeviceQuery{Model: "gw-100"})
	for _, d := range page.Devices {
		if d.Firmware != "1.0.0" {
			t.Errorf("%s on %s after the rollback, want 1.0.0", d.ID, d.Firmware)
		}
	}
	hist, _ := api.CampaignHistory(ctx, camp.ID)
	if last := hist[len(hist)-1]; last.Action != "rolled_back" {
		t.Errorf("history ends with %s", last.Action)
	}
	started := false
	for _, h := range hist {
		started = started || (h.Action == "start" && strings.HasPrefix(h.Actor, "bootstrap break-glass@127.0.0.1"))
	}
	if !started {
		t.Errorf("history does not say who started: %+v", hist)
	}
}

func TestFirmwareAndCampaignAPI(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t), "FLEETD_OTA_MAX_DOWNLOADS=1")
	ctx := context.Background()
	image := bytes.Repeat([]byte("firmware"), 16<<10)
	art, err := api.UploadFirmware(ctx, "1.0.3", []string{"gw-100"}, bytes.NewReader(image))
	if err != nil {
		t.Fatal(err)
	}
	_, err = api.UploadFirmware(ctx, "1.0.3", []string{"gw-100"}, bytes.NewReader(image))
	wantAPIError(t, err, http.StatusConflict, "")
	_, err = api.UploadFirmware(ctx, "", []string{"gw-100"}, bytes.NewReader(image))
	wantAPIError(t, err, http.StatusBadRequest, "version")
	_, err = api.UploadFirmware(ctx, "9.9.9", nil, bytes.NewReader(image))
	wantAPIError(t, err, http.StatusBadRequest, "models")

	// A target flagged as rejecting pings is refused.
	if err := api.DecideVerdict(ctx, "gw-100", "1.0.3", "confirmed"); err != nil {
		t.Fatal(err)
	}
	p.WaitMetric("fleetd_flagged_firmware", 1, 10*time.Second) // the analysis applies the decision
	spec := firmware.Spec{Name: "bad idea", FirmwareID: art.ID, Stages: []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 0.1}},
		DeviceTimeout: firmware.Duration(time.Minute)}
	_, err = api.CreateCampaign(ctx, spec)
	wantAPIError(t, err, http.StatusBadRequest, "firmware_id")
	api.DecideVerdict(ctx, "gw-100", "1.0.3", "")
	p.WaitMetric("fleetd_flagged_firmware", 0, 10*time.Second)

	other := spec
	other.Selector.Models = []string{"th-10"}
	_, err = api.CreateCampaign(ctx, other)
	wantAPIError(t, err, http.StatusBadRequest, "selector.models[0]")
	noStages := spec
	noStages.Stages = nil
	_, err = api.CreateCampaign(ctx, noStages)
	wantAPIError(t, err, http.StatusBadRequest, "stages")
	camp, err := api.CreateCampaign(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	_, err = api.CampaignAction(ctx, camp.ID, "start")
	wantAPIError(t, err, http.StatusBadRequest, "selector") // no device registered
	_, err = api.CampaignAction(ctx, camp.ID, "pause")
	wantAPIError(t, err, http.StatusConflict, "")

	req, _ := http.NewRequest(http.MethodDelete, p.HTTPURL+"/api/v1/firmware/"+art.ID, nil)
	req.Header.Set("Authorization", "Bearer "+p.Token())
	resp, _ := http.DefaultClient.Do(req)
	resp.Body.Close()
	if resp.StatusCode != http.StatusConflict {
		t.Fatalf("deleting firmware used by a campaign: %d, want 409", resp.StatusCode)
	}

	// Downloads: the admin may fetch a range; a device needs a valid signed URL.
	get := func(url string, hdr map[string]string) (*http.Response, []byte) {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, b
	}
	dl := p.HTTPURL + "/api/v1/firmware/" + art.ID + "/download"
	resp, body := get(dl, map[string]string{"Authorization": "Bearer " + p.Token(), "Range": "bytes=8-15"})
	if resp.StatusCode != http.StatusPartialContent || string(body) != "firmware" || resp.Header.Get("ETag") != `"`+art.SHA256+`"` {
		t.Fatalf("ranged download: %d %q etag %s", resp.StatusCode, body, resp.Header.Get("ETag"))
	}
	if resp, _ := get(dl, nil); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("download without credentials: %d", resp.StatusCode)
	}
	if resp, _ := get(dl+"?device=gw-1&expires=9999999999&sig=forged", nil); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("download with a forged signature: %d", resp.StatusCode)
	}

	// One download at a time: a second concurrent one is told to come back.
	// The image is larger than the socket buffers, so the first download
	// stays in progress while nobody reads it.
	big, err := api.UploadFirmware(ctx, "big", []string{"gw-100"}, io.LimitReader(zeros{}, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	dl = p.HTTPURL + "/api/v1/firmware/" + big.ID + "/download"
	slow, _ := http.NewRequest(http.MethodGet, dl, nil)
	slow.Header.Set("Authorization", "Bearer "+p.Token())
	first, err := http.DefaultClient.Do(slow)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Body.Close()
	resp, _ = get(dl, map[string]string{"Authorization": "Bearer " + p.Token()})
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("download over the cap: %d, Retry-After %q; want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
