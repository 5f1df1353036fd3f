package sim

import (
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

func field(name string) string { return "cohorts[0]." + name }

func TestLinkValidate(t *testing.T) {
	for _, tc := range []struct {
		name      string
		link      Link
		telemetry time.Duration
		want      string
	}{
		{"needs telemetry", Link{}, 0, "telemetry"},
		{"rssi out of range", Link{RSSI: -120}, time.Second, "rssi_dbm"},
		{"bad band", Link{Band: "3"}, time.Second, "band"},
		{"bad bssid", Link{BSSIDs: []string{"AA:BB:CC:DD:EE:FF"}}, time.Second, "bssids"},
		{"drop on roam without roaming", Link{DropOnRoam: true}, time.Second, "roam_every"},
		{"chance above 1", Link{DropBelow: -70, DropChance: 2}, time.Second, "drop_chance"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := tc.link
			err := l.validate("gw", tc.telemetry, field)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("validate: %v, want an error naming %s", err, tc.want)
			}
		})
	}
	l := Link{DropBelow: -70}
	if err := l.validate("gw", time.Second, field); err != nil {
		t.Fatal(err)
	}
	if l.RSSI != -60 || l.Spread != 4 || l.Channel != 6 || l.Band != "2.4" || len(l.BSSIDs) != 1 || l.DropChance != 0.5 {
		t.Fatalf("defaults: %+v", l)
	}
}

// TestLinkModel: the signal wanders within three spreads of its mean; a
// weak link drops only below its threshold; a bad access point drops at its
// rate whatever the signal; roaming walks the access points.
func TestLinkModel(t *testing.T) {
	weak := Link{RSSI: -72, Spread: 4, DropBelow: -74}
	bad := Link{RSSI: -55, DropsPerHour: 360, BSSIDs: []string{"02:00:00:00:00:01", "02:00:00:00:00:02"}}
	for _, l := range []*Link{&weak, &bad} {
		if err := l.validate("gw", time.Second, field); err != nil {
			t.Fatal(err)
		}
	}
	ws := newLinkState(&weak, rand.New(rand.NewPCG(1, 2)), 0)
	drops, low := 0, 0
	for range 10000 {
		d := ws.tick(time.Second)
		if ws.rssi < weak.RSSI-3*weak.Spread || ws.rssi > weak.RSSI+3*weak.Spread {
			t.Fatalf("rssi %v left the band around %v", ws.rssi, weak.RSSI)
		}
		if ws.rssi < weak.DropBelow {
			low++
		} else if d {
			t.Fatalf("a drop at %v dBm, above the threshold %v", ws.rssi, weak.DropBelow)
		}
		if d {
			drops++
		}
	}
	if low == 0 || drops < low/3 || drops > low*2/3 {
		t.Fatalf("%d drops over %d ticks below the threshold: want about half", drops, low)
	}
	bs := newLinkState(&bad, rand.New(rand.NewPCG(3, 4)), 1)
	drops = 0
	for range 10000 {
		if bs.tick(time.Second) {
			drops++
		}
	}
	if drops < 700 || drops > 1300 { // 360/h over 10 000 s: 1000
		t.Fatalf("%d random drops over 10 000 s at 360 per hour", drops)
	}
	msg := map[string]any{}
	bs.report(msg)
	if msg["bssid"] != "02:00:00:00:00:02" || msg["channel"] != 6 || msg["band"] != "2.4" {
		t.Fatalf("report %v", msg)
	}
	bs.roam()
	bs.report(msg)
	if msg["bssid"] != "02:00:00:00:00:01" {
		t.Fatalf("after a roam: %v", msg)
	}
}
