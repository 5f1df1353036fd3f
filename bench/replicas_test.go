package bench

import (
	"os/exec"
	"strings"
	"testing"
)

// TestReplicasBenchmarkSmoke runs `bench/run.sh replicas` in its smoke mode
// (2 replicas, 200 devices, HAProxy in front; about 20 s) so that it does
// not rot. It needs haproxy, as the replica tests do.
func TestReplicasBenchmarkSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("the smoke run of the replicas benchmark takes about 20 s")
	}
	out, err := exec.Command("bash", "run.sh", "replicas", "--smoke").CombinedOutput()
	if err != nil {
		t.Fatalf("bench/run.sh replicas --smoke: %v\n%s", err, out)
	}
	for _, want := range []string{"## replicas", "- connects: ", "- kicks ", "- campaign ", "- job delivery: ", "RSS holding the fleet: r1 "} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("no %q in the result:\n%s", want, out)
		}
	}
}
