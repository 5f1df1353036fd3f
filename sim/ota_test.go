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
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware/manifest"
	"github.com/fleetd/fleetd/internal/brokertest"
	"github.com/fleetd/fleetd/sim"
)

// TestOTARoundTrip gives simulated devices a stand-in OTA job (the real
// campaign pipeline is not involved): the image is downloaded with a resume
// after a cut, verified, installed, and the device comes back announcing the
// new version; a device whose image is corrupted reports why it failed.
func TestOTARoundTrip(t *testing.T) {
	env := brokertest.Start(t, nil)
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	image := make([]byte, 256<<10)
	rand.Read(image)
	sum := sha256.Sum256(image)

	var mu sync.Mutex
	var ranges []string
	statuses := map[string][]string{} // device → states (and errors)
	var credentials []string          // Authorization headers sent to the job URL: there must be none
	files := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if a := r.Header.Get("Authorization"); a != "" {
			credentials = append(credentials, a)
		}
		if rg := r.Header.Get("Range"); rg != "" {
			ranges = append(ranges, rg)
		}
		mu.Unlock()
		w.Header().Set("ETag", `"`+hex.EncodeToString(sum[:8])+`"`)
		http.ServeContent(w, r, "fw.bin", time.Unix(1700000000, 0), bytes.NewReader(image))
	}))
	defer files.Close()
	env.Broker.Handle("ota/status", func(id string, payload []byte) error {
		var st struct{ State, Error string }
		json.Unmarshal(payload, &st)
		mu.Lock()
		statuses[id] = append(statuses[id], st.State+st.Error)
		mu.Unlock()
		return nil
	})

	tokens := map[string]string{"ota-good-0": env.Register(t, "ota-good-0", "gw-100"), "ota-bad-0": env.Register(t, "ota-bad-0", "gw-100"),
		"ota-picky-0": env.Register(t, "ota-picky-0", "gw-100")}
	tokFile := filepath.Join(t.TempDir(), "tokens.json")
	b, _ := json.Marshal(tokens)
	os.WriteFile(tokFile, b, 0o600)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + env.Addrs["tcp"]},
		Run:    sim.RunOptions{Duration: secs(30), TokensFile: tokFile},
		OTA:    sim.OTAOptions{PublicKey: base64.StdEncoding.EncodeToString(pub), InstallTime: secs(0.2), InterruptDownloads: true},
		Cohorts: []sim.Cohort{
			{Name: "ota-good", Count: 1, Model: "gw-100", Firmware: "1.0.3"},
			{Name: "ota-bad", Count: 1, Model: "gw-100", Firmware: "1.0.3", OTAFailure: sim.OTAFailure{Mode: "checksum_mismatch"}},
			{Name: "ota-picky", Count: 1, Model: "gw-100", Firmware: "1.0.3"},
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

	img := manifest.Image{SHA256: hex.EncodeToString(sum[:]), Size: int64(len(image)), Version: "1.2.0", Models: []string{"gw-100"}}
	fwURL := files.URL + "/fw.bin"
	jobFor := func(device, jobID, url string, edit func(*manifest.Job), key ed25519.PrivateKey) []byte {
		m := manifest.Job{Image: img, JobID: jobID, DeviceID: device, Expires: time.Now().Add(time.Hour)}
		m.Models = append([]string(nil), img.Models...)
		if edit != nil {
			edit(&m)
		}
		b, _ := json.Marshal(map[string]any{"job_id": jobID, "campaign_id": "c-1", "url": url,
			"signature": manifest.SignImage(priv, m.Image), "manifest": m, "manifest_signature": manifest.SignJob(key, m)})
		return b
	}
	history := func(id string) string {
		mu.Lock()
		defer mu.Unlock()
		return strings.Join(statuses[id], ",")
	}
	// A device refuses, before downloading anything, every job whose signed
	// manifest is not for it, is expired, downgrades it, or is not signed by
	// a key it trusts.
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	refusals := []struct {
		job  []byte
		want string
	}{
		{jobFor("ota-picky-0", "r-model", fwURL, func(m *manifest.Job) { m.Models = []string{"gw-200"} }, priv), "for models"},
		{jobFor("ota-picky-0", "r-device", fwURL, func(m *manifest.Job) { m.DeviceID = "ota-good-0" }, priv), "for device"},
		{jobFor("ota-picky-0", "r-older", fwURL, func(m *manifest.Job) { m.Version = "1.0.0" }, priv), "not a rollback"},
		{jobFor("ota-picky-0", "r-expired", fwURL, func(m *manifest.Job) { m.Expires = time.Now().Add(-time.Minute) }, priv), "expired"},
		{jobFor("ota-picky-0", "r-stranger", fwURL, nil, stranger), "trusted key"},
		{jobFor("ota-picky-0", "r-host", "http://firmware.example.com/fw.bin", nil, priv), "not loopback"},
	}
	deadline := time.Now().Add(20 * time.Second)
	for i, r := range refusals {
		for strings.Count(history("ota-picky-0"), "failedrefused") <= i {
			if time.Now().After(deadline) {
				t.Fatalf("ota-picky-0 did not refuse job %d: %q", i, history("ota-picky-0"))
			}
			env.Broker.Send("ota-picky-0", "ota/job", r.job)
			time.Sleep(300 * time.Millisecond)
		}
		if h := history("ota-picky-0"); !strings.Contains(h, r.want) {
			t.Errorf("refusal %d: %q does not say %q", i, h, r.want)
		}
	}
	if h := history("ota-picky-0"); strings.Contains(h, "downloading") {
		t.Errorf("a refused job was downloaded: %s", h)
	}
	jobs := map[string][]byte{"ota-good-0": jobFor("ota-good-0", "job-1", fwURL, nil, priv), "ota-bad-0": jobFor("ota-bad-0", "job-2", fwURL, nil, priv)}
	// Send until the device has subscribed and starts downloading.
	for _, id := range []string{"ota-good-0", "ota-bad-0"} {
		for !strings.Contains(history(id), "downloading") {
			if time.Now().After(deadline) {
				t.Fatalf("%s never started the job: %q", id, history(id))
			}
			env.Broker.Send(id, "ota/job", jobs[id])
			time.Sleep(300 * time.Millisecond)
		}
	}
	for !strings.Contains(history("ota-good-0"), "succeeded") || !strings.Contains(history("ota-bad-0"), "failed") {
		if time.Now().After(deadline) {
			t.Fatalf("jobs did not finish: good %q, bad %q", history("ota-good-0"), history("ota-bad-0"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	good := history("ota-good-0")
	for _, state := range []string{"downloading", "verifying", "installing", "rebooting", "succeeded"} {
		if !strings.Contains(good, state) {
			t.Errorf("good device never reported %s: %s", state, good)
		}
	}
	if bad := history("ota-bad-0"); !strings.Contains(bad, "failedsha256 mismatch") || strings.Contains(bad, "installing") {
		t.Errorf("corrupted image: %s; want a sha256 failure before any install", bad)
	}
	mu.Lock()
	resumed := len(ranges) > 0 && strings.HasPrefix(ranges[0], "bytes=")
	sentCredentials := credentials
	mu.Unlock()
	if len(sentCredentials) > 0 {
		t.Errorf("devices sent credentials to the job URL: %q", sentCredentials)
	}
	if !resumed {
		t.Errorf("no download was resumed with Range: %v", ranges)
	}
	d, err := env.Service.Get(context.Background(), "ota-good-0")
	if err != nil || d.Firmware != "1.2.0" {
		t.Fatalf("after the upgrade the registry says firmware %q (%v), want 1.2.0", d.Firmware, err)
	}
	if d, _ := env.Service.Get(context.Background(), "ota-bad-0"); d.Firmware != "1.0.3" {
		t.Fatalf("failed device changed firmware to %s", d.Firmware)
	}
}
