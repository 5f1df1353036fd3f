package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
)

// TestFleetctl runs the fleetctl binary against a real fleetd: devices,
// firmware, a campaign created from a YAML spec and watched to the end,
// fleet health, and the errors an operator sees.
func TestFleetctl(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
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

	out := must("devices", "register", "ctl-1", "-model", "gw-100", "-tags", "site=lyon")
	if !strings.Contains(out, "token") {
		t.Fatalf("register shows no token:\n%s", out)
	}
	out = must("-output", "json", "devices", "list", "-model", "gw-100")
	var devices []fleet.Device
	if err := json.Unmarshal([]byte(out), &devices); err != nil || len(devices) != 1 || devices[0].Tags[0] != "site=lyon" {
		t.Fatalf("devices list -output json: %v\n%s", err, out)
	}
	if out := must("devices", "get", "ctl-1"); !strings.Contains(out, "gw-100") {
		t.Fatalf("devices get:\n%s", out)
	}
	if out := must("devices", "rotate", "ctl-1"); !strings.Contains(out, "shown once") {
		t.Fatalf("devices rotate:\n%s", out)
	}
	if out, err := fleetctl("devices", "register", "ctl-1"); err == nil || !strings.Contains(out, "409") {
		t.Fatalf("duplicate register: %v\n%s", err, out)
	}
	if out, err := fleetctl("devices", "register", "bad/id"); err == nil || !strings.Contains(out, "field id") {
		t.Fatalf("bad id: %v\n%s", err, out)
	}
	must("devices", "decommission", "ctl-1")

	image := filepath.Join(dir, "fw.bin")
	os.WriteFile(image, []byte(strings.Repeat("fleetd firmware ", 4096)), 0o644)
	out = must("-output", "json", "firmware", "upload", image, "-version", "4.0.0", "-models", "gw-100")
	var art struct{ ID, SHA256 string }
	json.Unmarshal([]byte(out), &art)
	if art.ID == "" || !strings.Contains(must("firmware", "list"), "4.0.0") {
		t.Fatalf("firmware upload/list:\n%s", out)
	}

	f := &sim.Fleet{
		Server:  sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:     sim.RunOptions{Duration: secs(120), Register: true, Ramp: 100},
		Cohorts: []sim.Cohort{{Name: "w", Count: 6, Model: "gw-100", Firmware: "3.9.0"}},
	}
	runFleet(t, api, f, p.Token())
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if out := must("-output", "json", "devices", "list", "-firmware", "3.9.0"); strings.Count(out, `"online": true`) == 6 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("fleet never came online")
		}
	}
	spec := filepath.Join(dir, "campaign.yaml")
	os.WriteFile(spec, []byte(`
name: to 4.0.0
firmware_id: `+art.ID+`
selector: {models: [gw-100], version: "<4.0.0"}
stages:
  - {name: canary, count: 2, soak: 1s, max_failure_rate: 0.5, max_not_back_online: -1}
  - {name: rest, percent: 100, max_failure_rate: 0.5, max_not_back_online: -1}
device_timeout: 60s
`), 0o644)
	out = must("-output", "json", "campaign", "create", "-f", spec)
	var camp struct{ ID string }
	json.Unmarshal([]byte(out), &camp)
	must("campaign", "start", camp.ID)
	out = must("campaign", "watch", camp.ID)
	if !strings.Contains(out, "completed") || !strings.Contains(out, "4/4 succeeded") || strings.Count(out, "stage") < 2 {
		t.Fatalf("campaign watch did not show the progress to the end:\n%s", out)
	}
	if out := must("campaign", "history", camp.ID); !strings.Contains(out, "complete") {
		t.Fatalf("campaign history:\n%s", out)
	}
	if out := must("fleet", "health"); !strings.Contains(out, "online") {
		t.Fatalf("fleet health:\n%s", out)
	}
	if out, err := fleetctl("campaign", "pause", camp.ID); err == nil || !strings.Contains(out, "409") {
		t.Fatalf("pausing a completed campaign: %v\n%s", err, out)
	}
	bad := exec.Command(bin, "-token", "wrong-token-0123456789", "fleet", "health")
	bad.Env = []string{"FLEETD_URL=" + p.HTTPURL}
	if out, err := bad.CombinedOutput(); err == nil || !strings.Contains(string(out), "401") || !strings.Contains(string(out), "warning: -token shows the admin token") {
		t.Fatalf("wrong token on the command line: %v\n%s (want a 401 and the warning about -token)", err, out)
	}
	// -token-file wins over the environment and needs no warning.
	viaFile := exec.Command(bin, "-token-file", filepath.Join(p.DataDir, "admin-token"), "fleet", "health")
	viaFile.Env = []string{"FLEETD_URL=" + p.HTTPURL, "FLEETD_ADMIN_TOKEN=wrong-token-0123456789"}
	if out, err := viaFile.CombinedOutput(); err != nil || strings.Contains(string(out), "warning") {
		t.Fatalf("-token-file: %v\n%s", err, out)
	}
	if out, err := fleetctl("frobnicate"); err == nil || !strings.Contains(out, "unknown command") {
		t.Fatalf("unknown command: %v\n%s", err, out)
	}
}
