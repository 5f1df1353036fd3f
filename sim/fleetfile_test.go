package sim

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"gopkg.in/yaml.v3"

	"github.com/fleetd/fleetd/firmware"
)

func TestLoadFleetFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fleet.yaml")
	os.WriteFile(path, []byte(`
server: {mqtt: "tcp://127.0.0.1:1883", api: "http://127.0.0.1:8080"}
run: {duration: 90s, register: true}
firmware: {"1.0.3": {pings: malformed}}
cohorts:
  - {name: gw, count: 2, firmware: 1.0.3, keepalive: 20, telemetry: 5s}
  - {name: jittery, count: 1, flap_every: 3s, flap_jitter: 3}
  - {name: nat, count: 2, duplicate_ids: true, duplicate_from: same_address}
  - {name: clone, count: 2, duplicate_ids: true}
  - {name: chatty, count: 1, oversized_every: 30s}
  - {name: chatty-1k, count: 1, oversized_every: 1m, oversized_bytes: 1024}
  - {name: zombie, count: 1, decommissioned: true}
`), 0o644)
	f, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	c := f.Cohorts[0]
	if f.Run.Duration.D() != 90*time.Second || c.Keepalive.D() != 20*time.Second || c.Telemetry.D() != 5*time.Second ||
		c.IDPrefix != "gw-" || c.Protocol != "3.1.1" || c.Reconnect != "backoff" || c.Credentials != "token" {
		t.Fatalf("defaults or durations wrong: %+v %+v", f.Run, c)
	}
	want := []Cohort{
		{FlapEvery: Duration(3 * time.Second), FlapJitter: Duration(3 * time.Second)},
		{DuplicateIDs: true, DuplicateFrom: "same_address"},
		{DuplicateIDs: true, DuplicateFrom: "different_addresses"},
		{OversizedEvery: Duration(30 * time.Second), OversizedBytes: 300000},
		{OversizedEvery: Duration(time.Minute), OversizedBytes: 1024},
		{Decommissioned: true},
	}
	for i, w := range want {
		g := f.Cohorts[i+1]
		got := Cohort{FlapEvery: g.FlapEvery, FlapJitter: g.FlapJitter, DuplicateIDs: g.DuplicateIDs, DuplicateFrom: g.DuplicateFrom,
			OversizedEvery: g.OversizedEvery, OversizedBytes: g.OversizedBytes, Decommissioned: g.Decommissioned}
		if diff := cmp.Diff(w, got); diff != "" {
			t.Errorf("cohort %s mismatch (-want +got):\n%s", g.Name, diff)
		}
	}
	if got := f.pingsFor(&c, "1.0.3"); got != "malformed" {
		t.Fatalf("firmware profile ignored: %s", got)
	}
	if got := f.pingsFor(&c, "1.2.0"); got != "normal" {
		t.Fatalf("upgraded firmware still misbehaves: %s", got)
	}
}

func TestFleetValidation(t *testing.T) {
	base := func() Fleet {
		return Fleet{Server: Server{MQTT: "tcp://127.0.0.1:1883", API: "http://127.0.0.1:8080"}, Run: RunOptions{Register: true},
			Cohorts: []Cohort{{Name: "c", Count: 1}}}
	}
	tests := []struct {
		name   string
		change func(*Fleet)
		want   string
	}{
		{"no cohorts", func(f *Fleet) { f.Cohorts = nil }, "cohorts"},
		{"zero count", func(f *Fleet) { f.Cohorts[0].Count = 0 }, "cohorts[0].count"},
		{"bad protocol", func(f *Fleet) { f.Cohorts[0].Protocol = "4.0" }, "cohorts[0].protocol"},
		{"bad pings", func(f *Fleet) { f.Cohorts[0].Pings = "sometimes" }, "cohorts[0].pings"},
		{"bad id prefix", func(f *Fleet) { f.Cohorts[0].IDPrefix = "a/b" }, "cohorts[0].id_prefix"},
		{"remote broker", func(f *Fleet) { f.Server.MQTT = "tcp://10.0.0.5:1883" }, "not loopback"},
		{"remote api", func(f *Fleet) { f.Server.API = "http://example.com" }, "not loopback"},
		{"cert without tls", func(f *Fleet) { f.Cohorts[0].Credentials = "cert" }, "tls://"},
		{"cert without CA", func(f *Fleet) { f.Cohorts[0].Credentials = "cert"; f.Cohorts[0].URL = "tls://127.0.0.1:8883" }, "device_ca"},
		{"no tokens", func(f *Fleet) { f.Run.Register = false }, "tokens_file"},
		{"bad ota mode", func(f *Fleet) { f.Cohorts[0].OTAFailure.Mode = "explodes" }, "ota_failure.mode"},
		{"bad source addr", func(f *Fleet) { f.Run.SourceAddrs = []string{"localhost"} }, "source_addrs"},
		{"duplicate prefix", func(f *Fleet) { f.Cohorts = append(f.Cohorts, Cohort{Name: "c", Count: 1}) }, "id_prefix"},
		{"negative flap jitter", func(f *Fleet) { f.Cohorts[0].FlapEvery, f.Cohorts[0].FlapJitter = Duration(time.Second), -1 }, "cohorts[0].flap_jitter"},
		{"flap jitter without flap_every", func(f *Fleet) { f.Cohorts[0].FlapJitter = Duration(time.Second) }, "cohorts[0].flap_jitter needs cohorts[0].flap_every"},
		{"bad duplicate_from", func(f *Fleet) { f.Cohorts[0].DuplicateIDs, f.Cohorts[0].DuplicateFrom = true, "nearby" }, "cohorts[0].duplicate_from"},
		{"duplicate_from without duplicate_ids", func(f *Fleet) { f.Cohorts[0].DuplicateFrom = "same_address" }, "cohorts[0].duplicate_from needs cohorts[0].duplicate_ids"},
		{"negative oversized_every", func(f *Fleet) { f.Cohorts[0].OversizedEvery = -1 }, "cohorts[0].oversized_every"},
		{"oversized_bytes without oversized_every", func(f *Fleet) { f.Cohorts[0].OversizedBytes = 300000 }, "cohorts[0].oversized_bytes needs cohorts[0].oversized_every"},
		{"oversized_bytes too small", func(f *Fleet) { f.Cohorts[0].OversizedEvery, f.Cohorts[0].OversizedBytes = Duration(time.Second), 100 }, "cohorts[0].oversized_bytes"},
		{"oversized_bytes too large", func(f *Fleet) {
			f.Cohorts[0].OversizedEvery, f.Cohorts[0].OversizedBytes = Duration(time.Second), 300<<20
		}, "cohorts[0].oversized_bytes"},
		{"negative start_after", func(f *Fleet) { f.Cohorts[0].StartAfter = -1 }, "cohorts[0].start_after"},
		{"start_after past the run", func(f *Fleet) { f.Run.Duration, f.Cohorts[0].StartAfter = Duration(time.Minute), Duration(time.Minute) }, "cohorts[0].start_after must be at least 0 and shorter than run.duration"},
		{"start_after with decommissioned", func(f *Fleet) { f.Cohorts[0].StartAfter, f.Cohorts[0].Decommissioned = Duration(time.Second), true }, "cohorts[0].start_after cannot be combined with cohorts[0].decommissioned"},
		{"start_after with duplicate ids", func(f *Fleet) { f.Cohorts[0].StartAfter, f.Cohorts[0].DuplicateIDs = Duration(time.Second), true }, "cohorts[0].start_after cannot be combined with cohorts[0].duplicate_ids"},
		{"tags without register", func(f *Fleet) {
			f.Run.Register, f.Run.TokensFile, f.Cohorts[0].Tags = false, "tokens.json", []string{"tz=Asia/Tokyo"}
		}, "cohorts[0].tags needs run.register"},
		{"bad tag", func(f *Fleet) { f.Cohorts[0].Tags = []string{"tz=Asia Tokyo"} }, "cohorts[0].tags: tags[0]"},
		{"a tag repeating the cohort's", func(f *Fleet) { f.Cohorts[0].Tags = []string{"sim=c"} }, "cohorts[0].tags: tags[1]"},
		{"decommissioned without register", func(f *Fleet) {
			f.Run.Register, f.Run.TokensFile, f.Cohorts[0].Decommissioned = false, "tokens.json", true
		}, "cohorts[0].decommissioned needs run.register"},
		{"decommissioned with a certificate", func(f *Fleet) {
			f.TLS = TLSFiles{DeviceCACert: "ca.crt", DeviceCAKey: "ca.key"}
			f.Cohorts[0].URL, f.Cohorts[0].Credentials, f.Cohorts[0].Decommissioned = "tls://127.0.0.1:8883", "cert", true
		}, "cohorts[0].decommissioned needs cohorts[0].credentials token"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := base()
			tt.change(&f)
			err := f.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error mentioning %q", err, tt.want)
			}
		})
	}
	allowed := base()
	allowed.Server.MQTT = "tcp://lab-broker:1883"
	allowed.Server.AllowedHosts = []string{"lab-broker"}
	if err := allowed.Validate(); err != nil {
		t.Fatalf("allowed host refused: %v", err)
	}
}

// TestWindowsFleetFile: docs/fleet.windows.yaml stays valid and gives its
// zoned cohorts a tz tag naming a zone that fleetd knows, and
// docs/campaign.windows.yaml is a campaign definition fleetd accepts (all
// but its firmware id, which the operator fills in).
func TestWindowsFleetFile(t *testing.T) {
	f, err := Load(filepath.Join("..", "docs", "fleet.windows.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	zones := map[string]bool{}
	for _, c := range f.Cohorts {
		for _, tag := range c.registeredTags() {
			if zone, ok := strings.CutPrefix(tag, "tz="); ok {
				if _, err := firmware.LoadZone(zone); err != nil {
					t.Errorf("cohort %s: %v", c.Name, err)
				}
				zones[zone] = true
			}
		}
	}
	if len(zones) < 3 {
		t.Errorf("the fleet spans %d zones, want at least 3", len(zones))
	}
	b, err := os.ReadFile(filepath.Join("..", "docs", "campaign.windows.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	j, _ := json.Marshal(doc)
	var spec firmware.Spec
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		t.Fatal(err)
	}
	camp := firmware.Campaign{Name: spec.Name, FirmwareID: spec.FirmwareID, Stages: spec.Stages, Pacing: spec.Pacing,
		DeviceTimeout: spec.DeviceTimeout, GateAction: spec.GateAction, Windows: spec.Windows, Timezone: spec.Timezone, TimezoneTag: spec.TimezoneTag}
	if err := camp.Validate(); err != nil {
		t.Fatalf("docs/campaign.windows.yaml: %v", err)
	}
}
