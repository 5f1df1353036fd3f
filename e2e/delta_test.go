package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// deltaImages uploads a base image (1.0.0) and a target (1.1.0) that is a
// small change of it, and writes the base where simulated devices on 1.0.0
// read the bytes they run.
func deltaImages(t *testing.T, api *client.Client) (base, target firmware.Artifact, baseFile string) {
	t.Helper()
	b := make([]byte, 768<<10)
	rand.Read(b)
	img := append([]byte(nil), b...)
	copy(img[100<<10:], "what changed between 1.0.0 and 1.1.0")
	img = append(img, "and a new table at the end"...)
	ctx := context.Background()
	var err error
	if base, err = api.UploadFirmware(ctx, "1.0.0", []string{"gw-100"}, bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
	if target, err = api.UploadFirmware(ctx, "1.1.0", []string{"gw-100"}, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	baseFile = filepath.Join(t.TempDir(), "1.0.0.bin")
	if err := os.WriteFile(baseFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return base, target, baseFile
}

// deltaFile finds the cached delta in a replica's firmware directory: the
// one file that is neither image.
func deltaFile(t *testing.T, dataDir string, images ...firmware.Artifact) string {
	t.Helper()
	skip := map[string]bool{}
	for _, a := range images {
		skip[a.SHA256] = true
	}
	var found []string
	files, _ := filepath.Glob(filepath.Join(dataDir, "firmware", "??", "*"))
	for _, f := range files {
		if !skip[filepath.Base(f)] {
			found = append(found, f)
		}
	}
	if len(found) != 1 {
		t.Fatalf("cached deltas %v, want one", found)
	}
	return found[0]
}

// TestCampaignDeltas: a delta campaign upgrades the devices on 1.0.0, whose
// image is stored, with a delta, and those on 0.9.0, whose image is not,
// with the full image; devices whose delta is damaged after the download
// fall back to the full image in the same job and succeed. The campaign's
// bytes sent and saved are the bytes each device was served.
func TestCampaignDeltas(t *testing.T) {
	dataDir := fleetdtest.DataDir(t)
	p, api := fastFleetd(t, dataDir)
	ctx := context.Background()
	base, target, baseFile := deltaImages(t, api)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:    sim.RunOptions{Duration: secs(300), Register: true, Ramp: 100},
		OTA:    sim.OTAOptions{Images: map[string]string{"1.0.0": baseFile}},
		Cohorts: []sim.Cohort{
			{Name: "base", Count: 4, Model: "gw-100", Firmware: "1.0.0"},
			{Name: "old", Count: 2, Model: "gw-100", Firmware: "0.9.0"},
			{Name: "bad", Count: 2, Model: "gw-100", Firmware: "1.0.0", OTAFailure: sim.OTAFailure{Mode: "bad_delta"}},
		},
	}
	_, stop := runFleet(t, api, f, p.Token())
	waitOnline(t, api, 8, 30*time.Second)
	camp, err := api.CreateCampaign(ctx, firmware.Spec{
		Name: "delta 1.1.0", FirmwareID: target.ID, Delta: true,
		Stages:        []firmware.Stage{{Name: "all", Percent: 100, MaxNotBackOnline: 0}},
		DeviceTimeout: firmware.Duration(60 * time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
	v := waitCampaign(t, api, camp.ID, 90*time.Second, "completion", func(v firmware.CampaignView) bool { return v.State == firmware.StateCompleted })
	if v.Counts[0].ByState["succeeded"] != 8 {
		t.Fatalf("counts %+v, want 8 succeeded", v.Counts)
	}
	st, err := os.Stat(deltaFile(t, dataDir, base, target))
	if err != nil {
		t.Fatal(err)
	}
	deltaSize := st.Size()
	if deltaSize >= target.Size/10 {
		t.Errorf("delta of %d bytes for a small change of a %d-byte image", deltaSize, target.Size)
	}
	devs, err := api.CampaignDevices(ctx, camp.ID)
	if err != nil {
		t.Fatal(err)
	}
	var sent int64
	for _, d := range devs {
		want := firmware.CampaignDevice{Delta: true, BytesSent: deltaSize}
		switch {
		case strings.HasPrefix(d.DeviceID, "old"):
			want = firmware.CampaignDevice{BytesSent: target.Size}
		case strings.HasPrefix(d.DeviceID, "bad"):
			want = firmware.CampaignDevice{Delta: true, FellBack: true, BytesSent: deltaSize + target.Size}
		}
		if d.Delta != want.Delta || d.FellBack != want.FellBack || d.BytesSent != want.BytesSent || d.State != "succeeded" {
			t.Errorf("%s (from %s): delta %v fell back %v sent %d state %s; want delta %v fell back %v sent %d, succeeded",
				d.DeviceID, d.FromVersion, d.Delta, d.FellBack, d.BytesSent, d.State, want.Delta, want.FellBack, want.BytesSent)
		}
		sent += d.BytesSent
	}
	want := firmware.DeltaStats{Sent: sent, Saved: 4*(target.Size-deltaSize) - 2*deltaSize, DeltaJobs: 6, FellBack: 2}
	if v.Bytes != want {
		t.Errorf("campaign bytes %+v, want %+v", v.Bytes, want)
	}
	summary := stop()
	if summary.Events["ota delta applied"] != 4 || summary.Events["ota delta fallbacks"] != 2 {
		t.Errorf("OTA events %v: want 4 deltas applied, 2 fallbacks", summary.Events)
	}
}

// TestCampaignDeltaForgedBytes: bytes served for a delta that are not the
// delta the signed manifest names (a replica's cached copy tampered with,
// same size, after the canary used it) are refused by the device, which
// installs the full image instead.
func TestCampaignDeltaForgedBytes(t *testing.T) {
	dataDir := fleetdtest.DataDir(t)
	p, api := fastFleetd(t, dataDir)
	ctx := context.Background()
	base, target, baseFile := deltaImages(t, api)
	f := &sim.Fleet{
		Server:  sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:     sim.RunOptions{Duration: secs(300), Register: true, Ramp: 100},
		OTA:     sim.OTAOptions{Images: map[string]string{"1.0.0": baseFile}},
		Cohorts: []sim.Cohort{{Name: "dev", Count: 2, Model: "gw-100", Firmware: "1.0.0"}},
	}
	_, stop := runFleet(t, api, f, p.Token())
	waitOnline(t, api, 2, 30*time.Second)
	camp, err := api.CreateCampaign(ctx, firmware.Spec{
		Name: "delta 1.1.0", FirmwareID: target.ID, Delta: true,
		Stages: []firmware.Stage{
			{Name: "canary", Count: 1, Soak: firmware.Duration(5 * time.Second), MaxNotBackOnline: 0},
			{Name: "rest", Percent: 100, MaxNotBackOnline: 0},
		},
		DeviceTimeout: firmware.Duration(60 * time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
	waitCampaign(t, api, camp.ID, 60*time.Second, "the canary", func(v firmware.CampaignView) bool { return v.Counts[0].ByState["succeeded"] == 1 })
	path := deltaFile(t, dataDir, base, target)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	v := waitCampaign(t, api, camp.ID, 60*time.Second, "completion", func(v firmware.CampaignView) bool { return v.State == firmware.StateCompleted })
	if v.Counts[1].ByState["succeeded"] != 1 {
		t.Fatalf("counts %+v, want the second device succeeded", v.Counts)
	}
	devs, err := api.CampaignDevices(ctx, camp.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		canary := d.Stage != nil && *d.Stage == 0
		if !d.Delta || d.FellBack == canary || d.State != "succeeded" {
			t.Errorf("%s (canary %v): delta %v fell back %v state %s; want the canary on the delta and the other fallen back to the image",
				d.DeviceID, canary, d.Delta, d.FellBack, d.State)
		}
	}
	if v.Bytes.FellBack != 1 {
		t.Errorf("campaign bytes %+v, want one fallback", v.Bytes)
	}
	summary := stop()
	if summary.Events["ota delta applied"] != 1 || summary.Events["ota delta fallbacks"] != 1 {
		t.Errorf("OTA events %v: want 1 delta applied, 1 fallback", summary.Events)
	}
}
