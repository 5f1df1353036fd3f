package sim_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/fleetd/fleetd/firmware/manifest"
	"github.com/fleetd/fleetd/internal/brokertest"
	"github.com/fleetd/fleetd/sim"
)

// TestOTADelta gives simulated devices stand-in delta jobs (no fleetd): a
// device on the base applies the delta and installs the result without the
// full image; a device whose delta is damaged after the download (bad_delta),
// one served bytes that are not the delta its manifest names (forged), and
// one that does not run the base each refuse the delta, say so, and install
// the full image in the same job; a manifest whose delta digest was altered
// without the signing key is refused before anything is downloaded.
func TestOTADelta(t *testing.T) {
	env := brokertest.Start(t, nil)
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	base := make([]byte, 512<<10)
	rand.Read(base)
	image := append([]byte(nil), base...)
	copy(image[4096:], "the new firmware's change")
	enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithEncoderDictRaw(1, base), zstd.WithWindowSize(1<<20))
	delta := enc.EncodeAll(image, nil)
	enc.Close()
	forged := append([]byte(nil), delta...)
	forged[len(forged)/2] ^= 0xff
	hexSum := func(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }
	baseFile := filepath.Join(t.TempDir(), "3.0.0.bin")
	if err := os.WriteFile(baseFile, base, 0o600); err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	served := map[string]int{} // path → requests
	statuses := map[string][]string{}
	files := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		served[r.URL.Path+" "+r.URL.Query().Get("device")]++
		mu.Unlock()
		body := map[string][]byte{"/fw.bin": image, "/fw.delta": delta, "/forged.delta": forged}[r.URL.Path]
		if body == nil {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "x", time.Unix(1700000000, 0), bytes.NewReader(body))
	}))
	defer files.Close()
	env.Broker.Handle("ota/status", func(id string, payload []byte) error {
		var st struct{ State, Error string }
		json.Unmarshal(payload, &st)
		mu.Lock()
		statuses[id] = append(statuses[id], st.State+" "+st.Error)
		mu.Unlock()
		return nil
	})
	ids := []string{"d-good-0", "d-bad-0", "d-forged-0", "d-nobase-0", "d-altered-0"}
	tokens := map[string]string{}
	for _, id := range ids {
		tokens[id] = env.Register(t, id, "gw-100")
	}
	tokFile := filepath.Join(t.TempDir(), "tokens.json")
	b, _ := json.Marshal(tokens)
	os.WriteFile(tokFile, b, 0o600)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + env.Addrs["tcp"]},
		Run:    sim.RunOptions{Duration: secs(40), TokensFile: tokFile},
		OTA: sim.OTAOptions{PublicKey: base64.StdEncoding.EncodeToString(pub), InstallTime: secs(0.2), InterruptDownloads: true,
			Images: map[string]string{"3.0.0": baseFile}},
		Cohorts: []sim.Cohort{
			{Name: "d-good", Count: 1, Model: "gw-100", Firmware: "3.0.0"},
			{Name: "d-bad", Count: 1, Model: "gw-100", Firmware: "3.0.0", OTAFailure: sim.OTAFailure{Mode: "bad_delta"}},
			{Name: "d-forged", Count: 1, Model: "gw-100", Firmware: "3.0.0"},
			{Name: "d-nobase", Count: 1, Model: "gw-100", Firmware: "2.9.0"},
			{Name: "d-altered", Count: 1, Model: "gw-100", Firmware: "3.0.0"},
		},
	}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := sim.New(context.Background(), f, sim.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan sim.Summary)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()

	img := manifest.Image{SHA256: hexSum(image), Size: int64(len(image)), Version: "3.1.0", Models: []string{"gw-100"}}
	dm := manifest.Delta{BaseVersion: "3.0.0", BaseSHA256: hexSum(base), SHA256: hexSum(delta), Size: int64(len(delta)),
		Encoding: manifest.EncodingZstdPatch, WindowSize: 1 << 20}
	jobFor := func(device, deltaPath string, alter bool) []byte {
		d := dm
		m := manifest.Job{Image: img, JobID: "job-" + device, DeviceID: device, Expires: time.Now().Add(time.Hour), Delta: &d}
		sig := manifest.SignJob(priv, m)
		if alter {
			altered := d
			altered.SHA256 = hexSum(forged)
			m.Delta = &altered
		}
		b, _ := json.Marshal(map[string]any{"job_id": m.JobID, "campaign_id": "c-1", "url": files.URL + "/fw.bin?device=" + device,
			"delta_url": files.URL + deltaPath + "?device=" + device, "signature": manifest.SignImage(priv, m.Image), "manifest": m, "manifest_signature": sig})
		return b
	}
	jobs := map[string][]byte{
		"d-good-0": jobFor("d-good-0", "/fw.delta", false), "d-bad-0": jobFor("d-bad-0", "/fw.delta", false),
		"d-forged-0": jobFor("d-forged-0", "/forged.delta", false), "d-nobase-0": jobFor("d-nobase-0", "/fw.delta", false),
		"d-altered-0": jobFor("d-altered-0", "/forged.delta", true),
	}
	history := func(id string) string {
		mu.Lock()
		defer mu.Unlock()
		return strings.Join(statuses[id], ",")
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, id := range ids {
		for history(id) == "" {
			if time.Now().After(deadline) {
				t.Fatalf("%s never answered its job", id)
			}
			env.Broker.Send(id, "ota/job", jobs[id])
			time.Sleep(300 * time.Millisecond)
		}
	}
	for _, id := range ids[:4] {
		for !strings.Contains(history(id), "succeeded") {
			if time.Now().After(deadline) {
				t.Fatalf("%s did not succeed: %q", id, history(id))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for !strings.Contains(history("d-altered-0"), "failed") {
		if time.Now().After(deadline) {
			t.Fatalf("d-altered-0 did not fail: %q", history("d-altered-0"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if h := history("d-good-0"); strings.Contains(h, "delta not used") {
		t.Errorf("d-good-0 fell back: %s", h)
	}
	for id, want := range map[string]string{"d-bad-0": "delta sha256 mismatch", "d-forged-0": "delta sha256 mismatch", "d-nobase-0": "this device runs image"} {
		if h := history(id); !strings.Contains(h, "delta not used") || !strings.Contains(h, want) {
			t.Errorf("%s: %s; want a fallback that says %q", id, h, want)
		}
	}
	if h := history("d-altered-0"); !strings.Contains(h, "failed refused: job manifest") || strings.Contains(h, "downloading") {
		t.Errorf("altered manifest: %s; want a refusal before any download", h)
	}
	mu.Lock()
	requests := maps.Clone(served)
	mu.Unlock()
	for _, c := range []struct {
		device      string
		delta, full bool
	}{
		{"d-good-0", true, false}, {"d-bad-0", true, true}, {"d-forged-0", true, true}, {"d-nobase-0", false, true}, {"d-altered-0", false, false},
	} {
		deltas := requests["/fw.delta "+c.device] + requests["/forged.delta "+c.device]
		if (deltas > 0) != c.delta || (requests["/fw.bin "+c.device] > 0) != c.full {
			t.Errorf("%s: %d delta and %d image requests; want delta %v, image %v", c.device, deltas, requests["/fw.bin "+c.device], c.delta, c.full)
		}
	}
	for _, id := range ids[:4] {
		d, err := env.Service.Get(context.Background(), id)
		if err != nil || d.Firmware != "3.1.0" {
			t.Errorf("%s: registry says firmware %q (%v), want 3.1.0", id, d.Firmware, err)
		}
	}
}
