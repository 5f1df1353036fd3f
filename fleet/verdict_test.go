package fleet

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestIsPingDisconnect(t *testing.T) {
	tests := []struct {
		name string
		e    Event
		want bool
	}{
		{"malformed PINGREQ", Event{Kind: KindDisconnect, Reason: ReasonProtocolError, Detail: "PINGREQ with reserved flags 0x2"}, true},
		{"other protocol error", Event{Kind: KindDisconnect, Reason: ReasonProtocolError, Detail: "malformed packet"}, false},
		{"PINGREQ not at the start", Event{Kind: KindDisconnect, Reason: ReasonProtocolError, Detail: "PUBLISH after PINGREQ"}, false},
		{"keepalive timeout without pings", Event{Kind: KindDisconnect, Reason: ReasonKeepaliveTimeout}, true},
		{"keepalive timeout after pings", Event{Kind: KindDisconnect, Reason: ReasonKeepaliveTimeout, Pings: 4}, false},
		{"connection lost without pings", Event{Kind: KindDisconnect, Reason: ReasonConnectionLost}, false},
		{"clean disconnect", Event{Kind: KindDisconnect, Reason: ReasonClientDisconnect}, false},
		{"not a disconnect", Event{Kind: KindRefused, Reason: ReasonKeepaliveTimeout}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := IsPingDisconnect(tt.e); got != tt.want {
				t.Errorf("IsPingDisconnect(%+v) = %v, want %v", tt.e, got, tt.want)
			}
		})
	}
}

func TestLearnVerdicts(t *testing.T) {
	p := VerdictPolicy{MinDevices: 3, MinDeviceHours: 0.05, MinEvents: 3, MinRate: 2, RateRatio: 5, ClearFraction: 0.6}
	sample := Event{DeviceID: "gw-7", At: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC), Kind: KindDisconnect,
		Reason: ReasonProtocolError, Detail: "PINGREQ with reserved flags 0x2", Firmware: "1.0.3", Model: "gw-100"}
	st := func(model, fw string, devices int, hours float64, pd int) FirmwareStats {
		return FirmwareStats{Model: model, Firmware: fw, Devices: devices, DeviceHours: hours, PingDisconnects: pd, Sessions: pd + devices}
	}
	withSamples := func(s FirmwareStats, e ...Event) FirmwareStats { s.Samples = e; return s }
	healthy := []FirmwareStats{st("gw-100", "1.2.0", 20, 50, 5), st("sensor-s1", "2.0.0", 10, 50, 5)}

	tests := []struct {
		name  string
		stats []FirmwareStats
		want  []Verdict
	}{
		{"buggy firmware among healthy ones", append([]FirmwareStats{withSamples(st("gw-100", "1.0.3", 4, 2, 40), sample)}, healthy...), []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 20, FleetRate: 0.1,
			Devices: 4, DeviceHours: 2, PingDisconnects: 40,
			Evidence: "40 ping-related disconnects over 4 devices and 2.0 device-hours (20/device-hour) vs 0.1/device-hour, the median of the other firmware",
			Samples:  []Event{sample},
		}}},
		{"healthy fleet", healthy, nil},
		{"no stats", nil, nil},
		{"two devices however bad", append([]FirmwareStats{st("gw-100", "1.0.3", 2, 10, 500)}, healthy...), nil},
		{"too few device-hours", append([]FirmwareStats{st("gw-100", "1.0.3", 3, 0.04, 30)}, healthy...), nil},
		{"too few events", append([]FirmwareStats{st("gw-100", "1.0.3", 3, 0.1, 2)}, healthy...), nil},
		{"at every minimum", append([]FirmwareStats{st("gw-100", "1.0.3", 3, 0.05, 3)}, healthy...), []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 60, FleetRate: 0.1,
			Devices: 3, DeviceHours: 0.05, PingDisconnects: 3,
			Evidence: "3 ping-related disconnects over 3 devices and 0.05 device-hours (60/device-hour) vs 0.1/device-hour, the median of the other firmware",
		}}},
		{"just below the ratio", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 49), st("gw-100", "1.2.0", 10, 10, 10)}, nil},
		{"at the ratio", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 50), st("gw-100", "1.2.0", 10, 10, 10)}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 5, FleetRate: 1,
			Devices: 3, DeviceHours: 10, PingDisconnects: 50,
			Evidence: "50 ping-related disconnects over 3 devices and 10 device-hours (5.0/device-hour) vs 1.0/device-hour, the median of the other firmware",
		}}},
		// Ratio 1 everywhere: the cause is not the firmware, even far above the floor.
		{"every firmware equally bad", []FirmwareStats{
			st("gw-100", "1.0.3", 5, 10, 100), st("gw-100", "1.2.0", 5, 10, 100), st("sensor-s1", "2.0.0", 5, 10, 100),
		}, nil},
		{"rest of the fleet clean: floor decides", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 20), st("gw-100", "1.2.0", 10, 10, 0)}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 2, FleetRate: 0,
			Devices: 3, DeviceHours: 10, PingDisconnects: 20,
			Evidence: "20 ping-related disconnects over 3 devices and 10 device-hours (2.0/device-hour) vs 0/device-hour, the median of the other firmware",
		}}},
		{"rest of the fleet clean, below the floor", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 19), st("gw-100", "1.2.0", 10, 10, 0)}, nil},
		{"no rest of the fleet: floor decides", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 20)}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 2, FleetRate: 0,
			Devices: 3, DeviceHours: 10, PingDisconnects: 20,
			Evidence: "20 ping-related disconnects over 3 devices and 10 device-hours (2.0/device-hour) vs 0/device-hour for the rest of the fleet",
		}}},
		// Pooled, the rest would be 210/110 = 1.9 a device-hour and 1.0.4 (8) would
		// stay under 5 × 1.9: the median of the others, 0.1, is not raised by 1.0.3.
		{"two bad firmware among healthy ones", append([]FirmwareStats{st("gw-100", "1.0.3", 4, 10, 200), st("gw-100", "1.0.4", 4, 10, 80)}, healthy...), []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 20, FleetRate: 0.1,
			Devices: 4, DeviceHours: 10, PingDisconnects: 200,
			Evidence: "200 ping-related disconnects over 4 devices and 10 device-hours (20/device-hour) vs 0.1/device-hour, the median of the other firmware",
		}, {
			Model: "gw-100", Firmware: "1.0.4", Flag: IncompatRejectsPings, Rate: 8, FleetRate: 0.1,
			Devices: 4, DeviceHours: 10, PingDisconnects: 80,
			Evidence: "80 ping-related disconnects over 4 devices and 10 device-hours (8.0/device-hour) vs 0.1/device-hour, the median of the other firmware",
		}}},
		// The others are at 0 and 40: the lower median is 0, so the floor decides
		// for 1.0.3, and 1.0.4 is measured against 0 and 3.
		{"lower median of two others", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 30), st("gw-100", "1.0.4", 3, 10, 400), st("gw-100", "1.2.0", 10, 10, 0)}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 3, FleetRate: 0,
			Devices: 3, DeviceHours: 10, PingDisconnects: 30,
			Evidence: "30 ping-related disconnects over 3 devices and 10 device-hours (3.0/device-hour) vs 0/device-hour, the median of the other firmware",
		}, {
			Model: "gw-100", Firmware: "1.0.4", Flag: IncompatRejectsPings, Rate: 40, FleetRate: 0,
			Devices: 3, DeviceHours: 10, PingDisconnects: 400,
			Evidence: "400 ping-related disconnects over 3 devices and 10 device-hours (40/device-hour) vs 0/device-hour, the median of the other firmware",
		}}},
		// No other firmware has 0.05 device-hours: the rest is pooled, 1 over
		// 1/16 device-hour.
		{"no other firmware with enough time: the rest pooled", []FirmwareStats{
			st("gw-100", "1.0.3", 3, 1, 100), st("gw-100", "1.2.0", 1, 1.0/32, 1), st("sensor-s1", "2.0.0", 1, 1.0/32, 0),
		}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 100, FleetRate: 16,
			Devices: 3, DeviceHours: 1, PingDisconnects: 100,
			Evidence: "100 ping-related disconnects over 3 devices and 1.0 device-hours (100/device-hour) vs 16/device-hour for the rest of the fleet",
		}}},
		{"no other firmware with enough time, below the ratio", []FirmwareStats{
			st("gw-100", "1.0.3", 3, 1, 79), st("gw-100", "1.2.0", 1, 1.0/32, 1), st("sensor-s1", "2.0.0", 1, 1.0/32, 0),
		}, nil},
		// Pooled with itself the fleet rate would be 110/20 = 5.5 and the ratio under 2.
		{"rest of the fleet excludes the firmware", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 100), st("gw-100", "1.2.0", 10, 10, 10)}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 10, FleetRate: 1,
			Devices: 3, DeviceHours: 10, PingDisconnects: 100,
			Evidence: "100 ping-related disconnects over 3 devices and 10 device-hours (10/device-hour) vs 1.0/device-hour, the median of the other firmware",
		}}},
		{"sorted by model then firmware, duplicates merged", []FirmwareStats{
			st("sensor-s1", "0.9.0", 3, 2, 40),
			st("gw-100", "1.0.3", 2, 1, 20), // merged with the row below: 3 devices
			st("gw-100", "1.2.0", 40, 98, 0),
			st("gw-100", "1.0.3", 1, 1, 20),
		}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 20, FleetRate: 0,
			Devices: 3, DeviceHours: 2, PingDisconnects: 40,
			Evidence: "40 ping-related disconnects over 3 devices and 2.0 device-hours (20/device-hour) vs 0/device-hour, the median of the other firmware",
		}, {
			Model: "sensor-s1", Firmware: "0.9.0", Flag: IncompatRejectsPings, Rate: 20, FleetRate: 0,
			Devices: 3, DeviceHours: 2, PingDisconnects: 40,
			Evidence: "40 ping-related disconnects over 3 devices and 2.0 device-hours (20/device-hour) vs 0/device-hour, the median of the other firmware",
		}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := LearnVerdicts(tt.stats, nil, p)
			if diff := cmp.Diff(Learned{Flagged: tt.want}, got); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestLearnVerdictsHysteresis(t *testing.T) {
	p := VerdictPolicy{MinDevices: 3, MinDeviceHours: 0.05, MinEvents: 3, MinRate: 2, RateRatio: 5, ClearFraction: 0.6}
	st := func(fw string, devices int, hours float64, pd int) FirmwareStats {
		return FirmwareStats{Model: "gw-100", Firmware: fw, Devices: devices, DeviceHours: hours, PingDisconnects: pd}
	}
	healthy := st("1.2.0", 10, 10, 10) // the baseline: 1 a device-hour
	was := map[FirmwareKey]bool{{"gw-100", "1.0.3"}: true}
	verdict := func(devices int, hours float64, pd int, baseline float64, evidence string) Verdict {
		return Verdict{Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: groupRate(st("", 0, hours, pd)), FleetRate: baseline,
			Devices: devices, DeviceHours: hours, PingDisconnects: pd, Evidence: evidence}
	}

	tests := []struct {
		name    string
		stats   []FirmwareStats
		flagged map[FirmwareKey]bool
		want    Learned
	}{
		{"not flagged before, ratio 4.9", []FirmwareStats{st("1.0.3", 3, 10, 49), healthy}, nil, Learned{}},
		{"not flagged before, ratio 4.9, other firmware flagged", []FirmwareStats{st("1.0.3", 3, 10, 49), healthy},
			map[FirmwareKey]bool{{"gw-100", "1.2.0"}: true}, Learned{Cleared: []Verdict{{
				Model: "gw-100", Firmware: "1.2.0", Flag: IncompatRejectsPings, Rate: 1, FleetRate: 4.9, Devices: 10, DeviceHours: 10, PingDisconnects: 10,
				Evidence: "10 ping-related disconnects over 10 devices and 10 device-hours (1.0/device-hour) vs 4.9/device-hour, the median of the other firmware: " +
					"below 15/device-hour (0.6 × the threshold of 24/device-hour), so the flag clears",
			}}}},
		{"flagged before, ratio 5.3: stays", []FirmwareStats{st("1.0.3", 3, 10, 53), healthy}, was, Learned{Flagged: []Verdict{
			verdict(3, 10, 53, 1, "53 ping-related disconnects over 3 devices and 10 device-hours (5.3/device-hour) vs 1.0/device-hour, the median of the other firmware"),
		}}},
		{"flagged before, ratio 4.0: stays", []FirmwareStats{st("1.0.3", 3, 10, 40), healthy}, was, Learned{Flagged: []Verdict{
			verdict(3, 10, 40, 1, "40 ping-related disconnects over 3 devices and 10 device-hours (4.0/device-hour) vs 1.0/device-hour, the median of the other firmware: "+
				"below the threshold of 5.0/device-hour but flagged before, so it stays flagged down to 3.0/device-hour"),
		}}},
		{"flagged before, ratio 3.0: stays", []FirmwareStats{st("1.0.3", 3, 10, 30), healthy}, was, Learned{Flagged: []Verdict{
			verdict(3, 10, 30, 1, "30 ping-related disconnects over 3 devices and 10 device-hours (3.0/device-hour) vs 1.0/device-hour, the median of the other firmware: "+
				"below the threshold of 5.0/device-hour but flagged before, so it stays flagged down to 3.0/device-hour"),
		}}},
		// Once flagged, the minimums no longer apply: evidence is enough.
		{"flagged before, on one device now: stays", []FirmwareStats{st("1.0.3", 1, 0.01, 1), healthy}, was, Learned{Flagged: []Verdict{
			verdict(1, 0.01, 1, 1, "1 ping-related disconnects over 1 devices and 0.01 device-hours (100/device-hour) vs 1.0/device-hour, the median of the other firmware: "+
				"too small a sample to flag but flagged before, so it stays flagged down to 3.0/device-hour"),
		}}},
		{"flagged before, ratio 2: cleared", []FirmwareStats{st("1.0.3", 3, 10, 20), healthy}, was, Learned{Cleared: []Verdict{
			verdict(3, 10, 20, 1, "20 ping-related disconnects over 3 devices and 10 device-hours (2.0/device-hour) vs 1.0/device-hour, the median of the other firmware: "+
				"below 3.0/device-hour (0.6 × the threshold of 5.0/device-hour), so the flag clears"),
		}}},
		{"flagged before, floor: stays above 0.6 × the floor", []FirmwareStats{st("1.0.3", 3, 10, 13), st("1.2.0", 10, 10, 0)}, was, Learned{Flagged: []Verdict{
			verdict(3, 10, 13, 0, "13 ping-related disconnects over 3 devices and 10 device-hours (1.3/device-hour) vs 0/device-hour, the median of the other firmware: "+
				"below the threshold of 2.0/device-hour but flagged before, so it stays flagged down to 1.2/device-hour"),
		}}},
		{"flagged before, floor: cleared below 0.6 × the floor", []FirmwareStats{st("1.0.3", 3, 10, 11), st("1.2.0", 10, 10, 0)}, was, Learned{Cleared: []Verdict{
			verdict(3, 10, 11, 0, "11 ping-related disconnects over 3 devices and 10 device-hours (1.1/device-hour) vs 0/device-hour, the median of the other firmware: "+
				"below 1.2/device-hour (0.6 × the threshold of 2.0/device-hour), so the flag clears"),
		}}},
		{"flagged before, no ping-related disconnects left: cleared", []FirmwareStats{st("1.0.3", 3, 10, 0), healthy}, was, Learned{Cleared: []Verdict{
			verdict(3, 10, 0, 1, "the evidence has aged out of the verdict window (0 ping-related disconnects over 3 devices and 10 device-hours left)"),
		}}},
		{"flagged before, no session left: cleared", []FirmwareStats{healthy}, was, Learned{Cleared: []Verdict{
			verdict(0, 0, 0, 1, "the evidence has aged out of the verdict window (0 ping-related disconnects over 0 devices and 0 device-hours left)"),
		}}},
		// Ratio 1 is below ClearFraction × RateRatio = 3: an equally bad fleet
		// clears a flag too.
		{"flagged before, every firmware equally bad now: cleared", []FirmwareStats{st("1.0.3", 5, 10, 100), st("1.2.0", 5, 10, 100), st("2.0.0", 5, 10, 100)}, was,
			Learned{Cleared: []Verdict{verdict(5, 10, 100, 10, "100 ping-related disconnects over 5 devices and 10 device-hours (10/device-hour) vs 10/device-hour, "+
				"the median of the other firmware: below 30/device-hour (0.6 × the threshold of 50/device-hour), so the flag clears")}}},
		{"a false entry is not flagged", []FirmwareStats{st("1.0.3", 3, 10, 40), healthy}, map[FirmwareKey]bool{{"gw-100", "1.0.3"}: false}, Learned{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := LearnVerdicts(tt.stats, tt.flagged, p)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestLearnVerdictsOscillation feeds each analysis the set the previous one
// flagged, as Analyze does through the database, while the firmware's ratio
// swings across the threshold: it flips once, not at every analysis.
func TestLearnVerdictsOscillation(t *testing.T) {
	p := DefaultVerdictPolicy()
	key := FirmwareKey{"gw-100", "1.0.3"}
	var flagged map[FirmwareKey]bool
	flips := 0
	for i := range 20 {
		pd := 40 // ratio 4.0
		if i%2 == 1 {
			pd = 53 // ratio 5.3
		}
		stats := []FirmwareStats{
			{Model: "gw-100", Firmware: "1.0.3", Devices: 3, DeviceHours: 10, PingDisconnects: pd},
			{Model: "gw-100", Firmware: "1.2.0", Devices: 10, DeviceHours: 10, PingDisconnects: 10},
		}
		got := LearnVerdicts(stats, flagged, p)
		next := map[FirmwareKey]bool{}
		for _, v := range got.Flagged {
			next[FirmwareKey{v.Model, v.Firmware}] = true
		}
		if next[key] != flagged[key] {
			flips++
		}
		flagged = next
	}
	if flips != 1 || !flagged[key] {
		t.Fatalf("%d flips, flagged at the end %v; want one flip, to flagged", flips, flagged[key])
	}
}

func TestVerdictDefaultPolicy(t *testing.T) {
	// Production minimums: a burst on a tiny sample never flags.
	p := DefaultVerdictPolicy()
	small := []FirmwareStats{{Model: "gw-100", Firmware: "1.0.3", Devices: 3, DeviceHours: 0.5, PingDisconnects: 20}}
	if got := LearnVerdicts(small, nil, p); got.Flagged != nil {
		t.Errorf("half a device-hour flagged: %+v", got)
	}
	enough := []FirmwareStats{{Model: "gw-100", Firmware: "1.0.3", Devices: 3, DeviceHours: 1, PingDisconnects: 5}}
	if got := LearnVerdicts(enough, nil, p); len(got.Flagged) != 1 {
		t.Errorf("3 devices, 1 device-hour, 5 events: got %+v, want one verdict", got)
	}
}

func TestVerdictIncompatibility(t *testing.T) {
	v := Verdict{Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Evidence: "40 ping-related disconnects"}
	want := Incompatibility{Reason: IncompatRejectsPings, Detail: "firmware 1.0.3 of model gw-100 rejects pings: 40 ping-related disconnects"}
	if diff := cmp.Diff(want, v.Incompatibility()); diff != "" {
		t.Errorf("mismatch (-want +got):\n%s", diff)
	}
}
