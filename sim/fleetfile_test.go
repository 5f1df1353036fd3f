package sim

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadFleetFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fleet.yaml")
	os.WriteFile(path, []byte(`
server: {mqtt: "tcp://127.0.0.1:1883", api: "http://127.0.0.1:8080"}
run: {duration: 90s, register: true}
firmware: {"1.0.3": {pings: malformed}}
cohorts:
  - {name: gw, count: 2, firmware: 1.0.3, keepalive: 20, telemetry: 5s}
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
