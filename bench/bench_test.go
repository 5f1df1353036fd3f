// Package bench holds the benchmarks' tools; this test runs every benchmark
// in its smoke mode (tiny N, a few seconds) so that none of them rots. The
// real runs are `bench/run.sh NAME`, results in bench/RESULTS.md.
package bench

import (
	"os/exec"
	"strings"
	"testing"
)

func TestBenchmarksSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("smoke runs of the benchmarks take about a minute")
	}
	for _, name := range []string{"connect-rate", "offline-detection", "per-message", "event-ingest", "telemetry-ingest", "idle-connections", "reconnect-storm", "ota-download", "campaign-dispatch", "data-scale", "ota-delta"} {
		t.Run(name, func(t *testing.T) {
			out, err := exec.Command("bash", "run.sh", name, "--smoke").CombinedOutput()
			if err != nil {
				t.Fatalf("bench/run.sh %s --smoke: %v\n%s", name, err, out)
			}
			if !strings.Contains(string(out), "## "+name) || !strings.Contains(string(out), "fleetd") && name != "event-ingest" {
				t.Fatalf("no result section:\n%s", out)
			}
			if name != "event-ingest" && name != "ota-download" && name != "campaign-dispatch" && name != "data-scale" && name != "ota-delta" && !strings.Contains(string(out), "mosquitto") {
				t.Fatalf("the peer's figures are missing:\n%s", out)
			}
		})
	}
}
