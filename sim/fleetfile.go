// Package sim plays fleets of MQTT devices, healthy and broken, against
// fleetd: the same device protocol as real firmware, including the bugs that
// fleetd exists to catch (malformed or missing pings, frozen sockets, shared
// client ids from two places or from behind one NAT, flapping on a fixed or a
// jittered period, oversized packets, bad credentials and certificates,
// decommissioned devices that keep trying, reconnect storms), and an OTA
// client. cmd/fleetsim runs it from a fleet file; the tests use it to build
// realistic fleets.
package sim

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/fleetd/fleetd/fleet"
)

// Duration reads "30s", "2m" or a number of seconds.
type Duration time.Duration

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

func (d *Duration) parse(s string) error {
	if n, err := strconv.ParseFloat(s, 64); err == nil {
		*d = Duration(n * float64(time.Second))
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration (e.g. 30s, 2m)", s)
	}
	*d = Duration(v)
	return nil
}

// UnmarshalYAML accepts a duration string or a number of seconds.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error { return d.parse(n.Value) }

// UnmarshalJSON accepts a duration string or a number of seconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		return d.parse(s)
	}
	return d.parse(string(b))
}

// Fleet is a fleet file: where fleetd is, how to run, and the cohorts of
// devices to play.
type Fleet struct {
	Server   Server                     `yaml:"server" json:"server"`
	TLS      TLSFiles                   `yaml:"tls" json:"tls"`
	Run      RunOptions                 `yaml:"run" json:"run"`
	Firmware map[string]FirmwareProfile `yaml:"firmware" json:"firmware"`
	OTA      OTAOptions                 `yaml:"ota" json:"ota"`
	Cohorts  []Cohort                   `yaml:"cohorts" json:"cohorts"`
}

// Server says where fleetd listens.
type Server struct {
	// MQTT is the broker URL: tcp://host:port, tls://host:port or ws://host:port/mqtt.
	MQTT string `yaml:"mqtt" json:"mqtt"`
	// API is fleetd's HTTP address, used to register devices.
	API string `yaml:"api" json:"api"`
	// AdminTokenFile holds the admin token (else FLEETD_ADMIN_TOKEN).
	AdminTokenFile string `yaml:"admin_token_file" json:"admin_token_file"`
	// CAFile verifies fleetd's TLS certificate.
	CAFile string `yaml:"ca_file" json:"ca_file"`
	// AllowedHosts are the hosts besides loopback the simulator may connect
	// to. Load must never leave the machine by accident.
	AllowedHosts []string `yaml:"allowed_hosts" json:"allowed_hosts"`
}

// TLSFiles is the device CA the simulator signs device certificates with.
type TLSFiles struct {
	DeviceCACert string `yaml:"device_ca_cert" json:"device_ca_cert"`
	DeviceCAKey  string `yaml:"device_ca_key" json:"device_ca_key"`
}

// RunOptions bound and pace a run.
type RunOptions struct {
	// Duration bounds the run (default 1m).
	Duration Duration `yaml:"duration" json:"duration"`
	// Ramp is how many devices start per second (default 100).
	Ramp float64 `yaml:"ramp" json:"ramp"`
	// SourceAddrs are local addresses to connect from, round robin, to pass
	// the ephemeral-port limit of one address (e.g. 127.0.0.1 … 127.0.0.8).
	SourceAddrs []string `yaml:"source_addrs" json:"source_addrs"`
	// Register registers the devices through the API (rotating the token of
	// a device that already exists). Otherwise TokensFile must hold them.
	Register   bool   `yaml:"register" json:"register"`
	TokensFile string `yaml:"tokens_file" json:"tokens_file"`
	// Progress prints a progress line every interval (0 = never).
	Progress Duration `yaml:"progress" json:"progress"`
}

// FirmwareProfile is how a firmware version behaves, whatever the cohort: a
// device upgraded to a fixed version stops misbehaving.
type FirmwareProfile struct {
	Pings string `yaml:"pings" json:"pings"` // normal, malformed, none
}

// OTAOptions configure the devices' OTA client.
type OTAOptions struct {
	// PublicKey is the base64 ed25519 key of the fleetd that issues jobs
	// (GET /api/v1/firmware/signing-key): it signs every job's manifest.
	PublicKey string `yaml:"public_key" json:"public_key"`
	// TrustedKeys are more base64 ed25519 keys whose image signatures the
	// devices accept (an operator's release keys).
	TrustedKeys []string `yaml:"trusted_keys" json:"trusted_keys"`
	// InstallTime is how long an install takes (default 1s).
	InstallTime Duration `yaml:"install_time" json:"install_time"`
	// InterruptDownloads cuts every device's first download attempt half
	// way, so the resume with Range is exercised.
	InterruptDownloads bool `yaml:"interrupt_downloads" json:"interrupt_downloads"`
	// Images are the files of firmware images by version: a device that
	// runs one of these versions holds its bytes (one copy per image for
	// the whole fleet) and applies a delta from it when a job offers one; a
	// device that installs an image keeps it too. Without them devices
	// take full images only.
	Images map[string]string `yaml:"images" json:"images"`
}

// Cohort is a group of identical devices.
type Cohort struct {
	Name      string   `yaml:"name" json:"name"`
	Count     int      `yaml:"count" json:"count"`
	IDPrefix  string   `yaml:"id_prefix" json:"id_prefix"`
	Model     string   `yaml:"model" json:"model"`
	Firmware  string   `yaml:"firmware" json:"firmware"`
	Protocol  string   `yaml:"protocol" json:"protocol"` // 3.1, 3.1.1 (default), 5
	Keepalive Duration `yaml:"keepalive" json:"keepalive"`
	Telemetry Duration `yaml:"telemetry" json:"telemetry"` // interval; 0 = none
	// URL overrides Server.MQTT for this cohort (e.g. a TLS cohort).
	URL string `yaml:"url" json:"url"`
	// StartAfter makes a fleet grow during a run: the cohort's devices
	// start this long after the run does, and with run.register they are
	// registered through the API only then, so fleetd sees devices
	// registered while a campaign runs (a campaign that follows the fleet
	// picks them up). It must be shorter than run.duration.
	StartAfter Duration `yaml:"start_after" json:"start_after"`
	// Tags are registered with every device of the cohort, besides
	// sim=<cohort>: e.g. tz=Asia/Tokyo, the zone a campaign's timezone_tag
	// reads for its maintenance windows. They need run.register.
	Tags []string `yaml:"tags" json:"tags"`

	// Pings: normal (default), malformed (PINGREQ with reserved flag bits
	// set) or none (never pings). A firmware profile overrides it.
	Pings string `yaml:"pings" json:"pings"`
	// FreezeAfter makes devices stop reading and writing, socket open,
	// this long after connecting, for FreezeFor (default 3 × keepalive);
	// then the watchdog reboots them.
	FreezeAfter Duration `yaml:"freeze_after" json:"freeze_after"`
	FreezeFor   Duration `yaml:"freeze_for" json:"freeze_for"`
	// FlapEvery drops the connection (no DISCONNECT) this long after each connect.
	FlapEvery Duration `yaml:"flap_every" json:"flap_every"`
	// FlapJitter adds a uniform random extra in [0, FlapJitter) to each
	// session before it is dropped (flap_every 3s, flap_jitter 3s: drops
	// every 3–6 s), as a marginal radio link does. The draws come from a
	// source seeded from the device id, so every run plays the same session
	// lengths. It needs flap_every.
	FlapJitter Duration `yaml:"flap_jitter" json:"flap_jitter"`
	// DuplicateIDs makes devices share ids in pairs.
	DuplicateIDs bool `yaml:"duplicate_ids" json:"duplicate_ids"`
	// DuplicateFrom says where a pair connects from: different_addresses
	// (default: two source addresses, two boxes flashed with one identity in
	// two places) or same_address (one source address, different ports: two
	// gateways behind one NAT router). It needs duplicate_ids.
	DuplicateFrom string `yaml:"duplicate_from" json:"duplicate_from"`
	// OversizedEvery makes the device publish one telemetry message whose
	// payload is OversizedBytes long (default 300000, above fleetd's default
	// maximum packet of 256 KiB, FLEETD_MQTT_MAX_PACKET) this long after each
	// connect: the broker ends the session (packet_too_large) and the device
	// reconnects.
	OversizedEvery Duration `yaml:"oversized_every" json:"oversized_every"`
	OversizedBytes int      `yaml:"oversized_bytes" json:"oversized_bytes"`
	// Decommissioned makes the simulator register the devices, so that they
	// hold a valid token, then decommission them through the API before the
	// run: they keep connecting with the revoked token, with the cohort's
	// reconnect policy, and are refused every time (the zombies of a real
	// fleet). It needs run.register and token credentials.
	Decommissioned bool `yaml:"decommissioned" json:"decommissioned"`
	// Link is the cohort's radio link (RSSI, channel, access points,
	// roaming) reported in its telemetry, and the drops it causes. It needs
	// telemetry.
	Link *Link `yaml:"link" json:"link"`
	// Credentials: token (default), bad_token, cert, expired_cert, unknown_ca_cert.
	Credentials string `yaml:"credentials" json:"credentials"`
	// Reconnect: backoff (exponential with full jitter, default) or naive (at once).
	Reconnect string `yaml:"reconnect" json:"reconnect"`
	// OTAFailure makes some OTA jobs fail.
	OTAFailure OTAFailure `yaml:"ota_failure" json:"ota_failure"`
}

// OTAFailure is how OTA jobs fail on a cohort.
type OTAFailure struct {
	// Mode: download_fails, checksum_mismatch, install_fails, never_returns,
	// or bad_delta (the delta's bytes are damaged after the download: the
	// device must refuse it and fall back to the full image).
	Mode string `yaml:"mode" json:"mode"`
	// Rate is the share of the cohort's jobs that fail, 0–1 (default 1),
	// spread evenly over the jobs so that small samples see it exactly.
	Rate float64 `yaml:"rate" json:"rate"`
}

// Sizes of an oversized message's payload. The default is above fleetd's
// default maximum packet (256 KiB); the bounds are those of fleetd's
// FLEETD_MQTT_MAX_PACKET (1 KiB) and, less room for the topic, of MQTT's
// largest packet (256 MiB).
const (
	defaultOversizedBytes = 300_000
	minOversizedBytes     = 1 << 10
	maxOversizedBytes     = 255 << 20
)

// Load reads a fleet file (YAML or JSON) and validates it.
func Load(path string) (*Fleet, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f Fleet
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if err := f.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &f, nil
}

// Validate checks the fleet and fills in defaults. Errors name the field.
func (f *Fleet) Validate() error {
	if f.Run.Duration == 0 {
		f.Run.Duration = Duration(time.Minute)
	}
	if f.Run.Ramp == 0 {
		f.Run.Ramp = 100
	}
	if f.Run.Ramp < 0 {
		return errors.New("run.ramp must be positive")
	}
	if f.OTA.InstallTime == 0 {
		f.OTA.InstallTime = Duration(time.Second)
	}
	if f.Server.MQTT == "" {
		return errors.New("server.mqtt is required (e.g. tcp://127.0.0.1:1883)")
	}
	if err := f.checkURL("server.mqtt", f.Server.MQTT); err != nil {
		return err
	}
	if f.Run.Register {
		if f.Server.API == "" {
			return errors.New("run.register needs server.api (e.g. http://127.0.0.1:8080)")
		}
		if err := f.checkURL("server.api", f.Server.API); err != nil {
			return err
		}
	} else if f.Run.TokensFile == "" && f.needsTokens() {
		return errors.New("either run.register or run.tokens_file is required")
	}
	for _, a := range f.Run.SourceAddrs {
		if net.ParseIP(a) == nil {
			return fmt.Errorf("run.source_addrs: %q is not an IP address", a)
		}
	}
	for v, p := range f.Firmware {
		if err := checkPings(p.Pings); err != nil {
			return fmt.Errorf("firmware.%s.pings: %w", v, err)
		}
	}
	if len(f.Cohorts) == 0 {
		return errors.New("cohorts: at least one cohort is required")
	}
	prefixes := map[string]bool{}
	for i := range f.Cohorts {
		c := &f.Cohorts[i]
		field := func(name string) string { return fmt.Sprintf("cohorts[%d].%s", i, name) }
		if c.Name == "" {
			c.Name = fmt.Sprintf("cohort-%d", i)
		}
		if c.Count < 1 {
			return fmt.Errorf("%s must be at least 1", field("count"))
		}
		if c.IDPrefix == "" {
			c.IDPrefix = c.Name + "-"
		}
		if prefixes[c.IDPrefix] {
			return fmt.Errorf("%s %q is used by another cohort", field("id_prefix"), c.IDPrefix)
		}
		prefixes[c.IDPrefix] = true
		if err := fleet.ValidateID(c.IDPrefix + "0"); err != nil {
			return fmt.Errorf("%s: %v", field("id_prefix"), err)
		}
		if len(c.Tags) > 0 {
			if !f.Run.Register {
				return fmt.Errorf("%s needs run.register (tags are given at registration)", field("tags"))
			}
			if err := (fleet.NewDevice{ID: c.IDPrefix + "0", Tags: c.registeredTags()}).Validate(); err != nil {
				return fmt.Errorf("%s: %v", field("tags"), err)
			}
		}
		if c.Firmware == "" {
			c.Firmware = "1.0.0"
		}
		if c.Protocol == "" {
			c.Protocol = "3.1.1"
		}
		if p, err := fleet.ParseProtocol(c.Protocol); err != nil || p == 0 {
			return fmt.Errorf("%s: %q: want 3.1, 3.1.1 or 5", field("protocol"), c.Protocol)
		}
		if c.Keepalive == 0 {
			c.Keepalive = Duration(30 * time.Second)
		}
		if c.Keepalive.D() < time.Second || c.Keepalive.D() > 65535*time.Second {
			return fmt.Errorf("%s must be between 1s and 65535s", field("keepalive"))
		}
		if c.URL != "" {
			if err := f.checkURL(field("url"), c.URL); err != nil {
				return err
			}
		}
		if err := checkPings(c.Pings); err != nil {
			return fmt.Errorf("%s: %w", field("pings"), err)
		}
		if c.FreezeAfter > 0 && c.FreezeFor == 0 {
			c.FreezeFor = 3 * c.Keepalive
		}
		switch c.Credentials {
		case "":
			c.Credentials = "token"
		case "token", "bad_token":
		case "cert", "expired_cert", "unknown_ca_cert":
			if !strings.HasPrefix(c.mqttURL(f), "tls://") {
				return fmt.Errorf("%s %s needs a tls:// url", field("credentials"), c.Credentials)
			}
			if c.Credentials != "unknown_ca_cert" && (f.TLS.DeviceCACert == "" || f.TLS.DeviceCAKey == "") {
				return fmt.Errorf("%s %s needs tls.device_ca_cert and tls.device_ca_key", field("credentials"), c.Credentials)
			}
		default:
			return fmt.Errorf("%s: %q: want token, bad_token, cert, expired_cert or unknown_ca_cert", field("credentials"), c.Credentials)
		}
		switch c.Reconnect {
		case "":
			c.Reconnect = "backoff"
		case "backoff", "naive":
		default:
			return fmt.Errorf("%s: %q: want backoff or naive", field("reconnect"), c.Reconnect)
		}
		if c.FlapJitter < 0 {
			return fmt.Errorf("%s must not be negative", field("flap_jitter"))
		}
		if c.FlapJitter > 0 && c.FlapEvery <= 0 {
			return fmt.Errorf("%s needs %s", field("flap_jitter"), field("flap_every"))
		}
		switch c.DuplicateFrom {
		case "":
			if c.DuplicateIDs {
				c.DuplicateFrom = "different_addresses"
			}
		case "different_addresses", "same_address":
			if !c.DuplicateIDs {
				return fmt.Errorf("%s needs %s: true", field("duplicate_from"), field("duplicate_ids"))
			}
		default:
			return fmt.Errorf("%s: %q: want different_addresses or same_address", field("duplicate_from"), c.DuplicateFrom)
		}
		if c.OversizedEvery < 0 {
			return fmt.Errorf("%s must not be negative", field("oversized_every"))
		}
		if c.OversizedBytes != 0 && c.OversizedEvery == 0 {
			return fmt.Errorf("%s needs %s", field("oversized_bytes"), field("oversized_every"))
		}
		if c.OversizedEvery > 0 && c.OversizedBytes == 0 {
			c.OversizedBytes = defaultOversizedBytes
		}
		if c.OversizedBytes != 0 && (c.OversizedBytes < minOversizedBytes || c.OversizedBytes > maxOversizedBytes) {
			return fmt.Errorf("%s must be between %d and %d (fleetd's maximum packet is 1 KiB to 256 MiB)",
				field("oversized_bytes"), minOversizedBytes, maxOversizedBytes)
		}
		if c.Link != nil {
			if err := c.Link.validate(c.Name, c.Telemetry.D(), field); err != nil {
				return err
			}
		}
		if c.Decommissioned {
			if !f.Run.Register {
				return fmt.Errorf("%s needs run.register: the simulator registers the devices, then decommissions them", field("decommissioned"))
			}
			if c.Credentials != "token" {
				return fmt.Errorf("%s needs %s token, not %s", field("decommissioned"), field("credentials"), c.Credentials)
			}
		}
		switch c.OTAFailure.Mode {
		case "", "download_fails", "checksum_mismatch", "install_fails", "never_returns", "bad_delta":
		default:
			return fmt.Errorf("%s: %q: want download_fails, checksum_mismatch, install_fails, never_returns or bad_delta", field("ota_failure.mode"), c.OTAFailure.Mode)
		}
		if c.StartAfter < 0 || c.StartAfter >= f.Run.Duration {
			return fmt.Errorf("%s must be at least 0 and shorter than run.duration (%s)", field("start_after"), f.Run.Duration.D())
		}
		if c.StartAfter > 0 && c.Decommissioned {
			return fmt.Errorf("%s cannot be combined with %s: decommissioned devices are registered before the run", field("start_after"), field("decommissioned"))
		}
		if c.StartAfter > 0 && c.DuplicateIDs && f.Run.Register {
			return fmt.Errorf("%s cannot be combined with %s and run.register: the second of a pair would rotate the first's token", field("start_after"), field("duplicate_ids"))
		}
		if c.OTAFailure.Mode != "" && c.OTAFailure.Rate == 0 {
			c.OTAFailure.Rate = 1
		}
		if c.OTAFailure.Rate < 0 || c.OTAFailure.Rate > 1 {
			return fmt.Errorf("%s must be between 0 and 1", field("ota_failure.rate"))
		}
	}
	return nil
}

func (f *Fleet) needsTokens() bool {
	for _, c := range f.Cohorts {
		if c.Credentials == "" || c.Credentials == "token" || c.Credentials == "bad_token" {
			return true
		}
	}
	return false
}

func checkPings(p string) error {
	switch p {
	case "", "normal", "malformed", "none":
		return nil
	}
	return fmt.Errorf("%q: want normal, malformed or none", p)
}

// checkURL refuses targets off this machine unless they are allowed: load
// tests must not hit anything by accident.
func (f *Fleet) checkURL(field, raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%s: %q is not a URL", field, raw)
	}
	switch u.Scheme {
	case "tcp", "mqtt", "tls", "ssl", "mqtts", "ws", "http", "https":
	default:
		return fmt.Errorf("%s: unsupported scheme %q", field, u.Scheme)
	}
	host := u.Hostname()
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	for _, h := range f.Server.AllowedHosts {
		if h == host {
			return nil
		}
	}
	return fmt.Errorf("%s: host %s is not loopback and not in server.allowed_hosts", field, host)
}

func (c *Cohort) mqttURL(f *Fleet) string {
	if c.URL != "" {
		return c.URL
	}
	return f.Server.MQTT
}

// pingsFor is how a device pings on a firmware: the firmware's profile wins
// over the cohort's setting.
func (f *Fleet) pingsFor(c *Cohort, firmware string) string {
	if p, ok := f.Firmware[firmware]; ok && p.Pings != "" {
		return p.Pings
	}
	if c.Pings == "" {
		return "normal"
	}
	return c.Pings
}

// registeredTags are the tags the simulator registers the cohort's devices
// with: its own tags, then sim=<cohort>.
func (c *Cohort) registeredTags() []string {
	return append(append([]string(nil), c.Tags...), "sim="+sanitizeTag(c.Name))
}
