package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/sim"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// TestRunAgainstFleetd runs the fleetsim binary with a fleet file against a
// real fleetd, as a user would, and reads its summary.
func TestRunAgainstFleetd(t *testing.T) {
	p := fleetdtest.Start(t, fleetdtest.DataDir(t))
	p.WaitReady(15 * time.Second)
	dir := t.TempDir()
	fleetFile := filepath.Join(dir, "fleet.yaml")
	os.WriteFile(fleetFile, []byte(`
server: {mqtt: "tcp://`+p.Addr("mqtt-tcp")+`", api: "`+p.HTTPURL+`", admin_token_file: "`+filepath.Join(p.DataDir, "admin-token")+`"}
run: {duration: 3s, register: true, ramp: 100}
cohorts:
  - {name: cli, count: 5, firmware: 1.2.0, telemetry: 500ms}
`), 0o644)
	summaryFile := filepath.Join(dir, "summary.json")
	cmd := exec.Command(fleetdtest.Build(t, "fleetsim"), "run", "-f", fleetFile, "-progress", "500ms", "-summary", summaryFile)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("fleetsim run: %v\n%s", err, stderr.String())
	}
	var s sim.Summary
	if err := json.Unmarshal(out, &s); err != nil {
		t.Fatalf("summary is not JSON: %v\n%s", err, out)
	}
	if s.Devices != 5 || s.Connects < 5 || s.MessagesSent < 20 || s.ConnectLatencyMS.P99 <= 0 {
		t.Fatalf("summary: %+v", s)
	}
	if !strings.Contains(stderr.String(), "online 5/5") {
		t.Errorf("no progress line showing all devices online:\n%s", stderr.String())
	}
	if _, err := os.Stat(summaryFile); err != nil {
		t.Errorf("summary file not written: %v", err)
	}
}

func TestUsageAndErrors(t *testing.T) {
	bin := fleetdtest.Build(t, "fleetsim")
	out, err := exec.Command(bin, "-h").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "fleetsim run -f FLEET_FILE") {
		t.Fatalf("-h: %v\n%s", err, out)
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte("server: {mqtt: \"tcp://127.0.0.1:1\", api: \"http://127.0.0.1:2\"}\nrun: {register: true}\ncohorts:\n  - {name: x, count: 1, protocol: \"9\"}\n"), 0o644)
	out, err = exec.Command(bin, "run", "-f", bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "cohorts[0].protocol") {
		t.Fatalf("bad fleet file: %v\n%s", err, out)
	}
	// The example fleet in docs/ must stay valid.
	if _, err := sim.Load(filepath.Join("..", "..", "docs", "fleet.example.yaml")); err != nil {
		t.Fatalf("docs/fleet.example.yaml: %v", err)
	}
}
