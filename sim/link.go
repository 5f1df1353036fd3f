package sim

import (
	"fmt"
	"math"
	"math/rand/v2"
	"regexp"
	"time"
)

// Link is a cohort's radio link: what its telemetry reports (RSSI, channel,
// access point) and the drops that follow from it — the causes fleetd's WiFi
// diagnosis must tell from the firmware's.
type Link struct {
	// RSSI is the mean signal in dBm (default -60); Spread how far it
	// wanders around it, in dB (default 4): a bounded random walk, one step
	// per telemetry message.
	RSSI   float64 `yaml:"rssi_dbm" json:"rssi_dbm"`
	Spread float64 `yaml:"rssi_spread_db" json:"rssi_spread_db"`
	// Channel is the WiFi channel (default 6); Band "2.4" (default), "5" or "6".
	Channel int    `yaml:"channel" json:"channel"`
	Band    string `yaml:"band" json:"band"`
	SSID    string `yaml:"ssid" json:"ssid"`
	// BSSIDs are the access points the devices associate with (default one,
	// derived from the cohort name); each device starts on one of them.
	BSSIDs []string `yaml:"bssids" json:"bssids"`
	// RoamEvery moves a device to the next access point this often (0 =
	// never); DropOnRoam drops the connection when it does, as clients
	// that lose their TCP sessions on a roam do (the device reports the new
	// access point in a telemetry message, then the connection is lost).
	RoamEvery  Duration `yaml:"roam_every" json:"roam_every"`
	DropOnRoam bool     `yaml:"drop_on_roam" json:"drop_on_roam"`
	// DropBelow drops the connection (no DISCONNECT) at a telemetry tick
	// whose RSSI is below it, with probability DropChance (default 0.5):
	// a weak link (0 = never).
	DropBelow  float64 `yaml:"drop_below_dbm" json:"drop_below_dbm"`
	DropChance float64 `yaml:"drop_chance" json:"drop_chance"`
	// DropsPerHour drops the connection at random, whatever the signal, at
	// this mean rate per connected hour: a congested channel or a bad
	// access point.
	DropsPerHour float64 `yaml:"drops_per_hour" json:"drops_per_hour"`
}

var bssidPattern = regexp.MustCompile(`^[0-9a-f]{2}(:[0-9a-f]{2}){5}$`)

// validate checks a cohort's link and fills in its defaults; telemetry is
// the cohort's telemetry interval, which carries the link's reports.
func (l *Link) validate(cohort string, telemetry time.Duration, field func(string) string) error {
	if telemetry <= 0 {
		return fmt.Errorf("%s needs %s: the link is reported in telemetry", field("link"), field("telemetry"))
	}
	if l.RSSI == 0 {
		l.RSSI = -60
	}
	if l.RSSI < -100 || l.RSSI > -20 {
		return fmt.Errorf("%s must be between -100 and -20 dBm", field("link.rssi_dbm"))
	}
	if l.Spread == 0 {
		l.Spread = 4
	}
	if l.Spread < 0 || l.Spread > 30 {
		return fmt.Errorf("%s must be between 0 and 30 dB", field("link.rssi_spread_db"))
	}
	if l.Channel == 0 {
		l.Channel = 6
	}
	if l.Channel < 1 || l.Channel > 233 {
		return fmt.Errorf("%s must be a WiFi channel (1-233)", field("link.channel"))
	}
	switch l.Band {
	case "":
		l.Band = "2.4"
	case "2.4", "5", "6":
	default:
		return fmt.Errorf("%s: %q: want 2.4, 5 or 6", field("link.band"), l.Band)
	}
	if l.SSID == "" {
		l.SSID = "fleet"
	}
	if len(l.SSID) > 32 {
		return fmt.Errorf("%s is longer than 32 bytes", field("link.ssid"))
	}
	if len(l.BSSIDs) == 0 {
		h := uint32(2166136261)
		for i := 0; i < len(cohort); i++ {
			h = (h ^ uint32(cohort[i])) * 16777619
		}
		l.BSSIDs = []string{fmt.Sprintf("02:00:%02x:%02x:%02x:%02x", byte(h>>24), byte(h>>16), byte(h>>8), byte(h))}
	}
	for _, b := range l.BSSIDs {
		if !bssidPattern.MatchString(b) {
			return fmt.Errorf("%s: %q is not a lower-case MAC address", field("link.bssids"), b)
		}
	}
	if l.RoamEvery < 0 || l.DropsPerHour < 0 || l.DropChance < 0 || l.DropChance > 1 {
		return fmt.Errorf("%s: roam_every and drops_per_hour must not be negative, drop_chance must be within 0-1", field("link"))
	}
	if l.DropOnRoam && l.RoamEvery == 0 {
		return fmt.Errorf("%s needs %s", field("link.drop_on_roam"), field("link.roam_every"))
	}
	if l.DropBelow != 0 && l.DropChance == 0 {
		l.DropChance = 0.5
	}
	return nil
}

// linkState is one device's link as it wanders.
type linkState struct {
	model *Link
	rnd   *rand.Rand
	rssi  float64
	ap    int
}

func newLinkState(l *Link, rnd *rand.Rand, deviceIndex int) *linkState {
	return &linkState{model: l, rnd: rnd, rssi: l.RSSI, ap: deviceIndex % len(l.BSSIDs)}
}

// tick moves the signal one step (a random walk pulled back to the mean,
// staying within three spreads of it) and says whether the link drops now,
// over a telemetry interval of every.
func (s *linkState) tick(every time.Duration) (drop bool) {
	l := s.model
	s.rssi += s.rnd.NormFloat64()*l.Spread/2 - (s.rssi-l.RSSI)/4
	s.rssi = math.Max(l.RSSI-3*l.Spread, math.Min(l.RSSI+3*l.Spread, s.rssi))
	if l.DropBelow != 0 && s.rssi < l.DropBelow && s.rnd.Float64() < l.DropChance {
		return true
	}
	return l.DropsPerHour > 0 && s.rnd.Float64() < l.DropsPerHour*every.Hours()
}

// roam moves the device to the next access point; it says whether the
// connection drops with it.
func (s *linkState) roam() (drop bool) {
	s.ap = (s.ap + 1) % len(s.model.BSSIDs)
	return s.model.DropOnRoam
}

// report is the link part of a telemetry message.
func (s *linkState) report(msg map[string]any) {
	msg["rssi_dbm"] = math.Round(s.rssi)
	msg["channel"] = s.model.Channel
	msg["band"] = s.model.Band
	msg["ssid"] = s.model.SSID
	msg["bssid"] = s.model.BSSIDs[s.ap]
}
