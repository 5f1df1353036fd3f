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
	p := VerdictPolicy{MinDevices: 3, MinDeviceHours: 0.05, MinEvents: 3, MinRate: 2, RateRatio: 5}
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
			Evidence: "40 ping-related disconnects over 4 devices and 2.0 device-hours (20/device-hour) vs 0.1/device-hour for the rest of the fleet",
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
			Evidence: "3 ping-related disconnects over 3 devices and 0.05 device-hours (60/device-hour) vs 0.1/device-hour for the rest of the fleet",
		}}},
		{"just below the ratio", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 49), st("gw-100", "1.2.0", 10, 10, 10)}, nil},
		{"at the ratio", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 50), st("gw-100", "1.2.0", 10, 10, 10)}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 5, FleetRate: 1,
			Devices: 3, DeviceHours: 10, PingDisconnects: 50,
			Evidence: "50 ping-related disconnects over 3 devices and 10 device-hours (5.0/device-hour) vs 1.0/device-hour for the rest of the fleet",
		}}},
		// Ratio 1 everywhere: the cause is not the firmware, even far above the floor.
		{"every firmware equally bad", []FirmwareStats{
			st("gw-100", "1.0.3", 5, 10, 100), st("gw-100", "1.2.0", 5, 10, 100), st("sensor-s1", "2.0.0", 5, 10, 100),
		}, nil},
		{"rest of the fleet clean: floor decides", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 20), st("gw-100", "1.2.0", 10, 10, 0)}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 2, FleetRate: 0,
			Devices: 3, DeviceHours: 10, PingDisconnects: 20,
			Evidence: "20 ping-related disconnects over 3 devices and 10 device-hours (2.0/device-hour) vs 0/device-hour for the rest of the fleet",
		}}},
		{"rest of the fleet clean, below the floor", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 19), st("gw-100", "1.2.0", 10, 10, 0)}, nil},
		{"no rest of the fleet: floor decides", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 20)}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 2, FleetRate: 0,
			Devices: 3, DeviceHours: 10, PingDisconnects: 20,
			Evidence: "20 ping-related disconnects over 3 devices and 10 device-hours (2.0/device-hour) vs 0/device-hour for the rest of the fleet",
		}}},
		// Pooled with itself the fleet rate would be 110/20 = 5.5 and the ratio under 2.
		{"rest of the fleet excludes the firmware", []FirmwareStats{st("gw-100", "1.0.3", 3, 10, 100), st("gw-100", "1.2.0", 10, 10, 10)}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 10, FleetRate: 1,
			Devices: 3, DeviceHours: 10, PingDisconnects: 100,
			Evidence: "100 ping-related disconnects over 3 devices and 10 device-hours (10/device-hour) vs 1.0/device-hour for the rest of the fleet",
		}}},
		{"sorted by model then firmware, duplicates merged", []FirmwareStats{
			st("sensor-s1", "0.9.0", 3, 2, 40),
			st("gw-100", "1.0.3", 2, 1, 20), // merged with the row below: 3 devices
			st("gw-100", "1.2.0", 40, 98, 0),
			st("gw-100", "1.0.3", 1, 1, 20),
		}, []Verdict{{
			Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 20, FleetRate: 0.4,
			Devices: 3, DeviceHours: 2, PingDisconnects: 40,
			Evidence: "40 ping-related disconnects over 3 devices and 2.0 device-hours (20/device-hour) vs 0.4/device-hour for the rest of the fleet",
		}, {
			Model: "sensor-s1", Firmware: "0.9.0", Flag: IncompatRejectsPings, Rate: 20, FleetRate: 0.4,
			Devices: 3, DeviceHours: 2, PingDisconnects: 40,
			Evidence: "40 ping-related disconnects over 3 devices and 2.0 device-hours (20/device-hour) vs 0.4/device-hour for the rest of the fleet",
		}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := LearnVerdicts(tt.stats, p)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestVerdictDefaultPolicy(t *testing.T) {
	// Production minimums: a burst on a tiny sample never flags.
	p := DefaultVerdictPolicy()
	small := []FirmwareStats{{Model: "gw-100", Firmware: "1.0.3", Devices: 3, DeviceHours: 0.5, PingDisconnects: 20}}
	if got := LearnVerdicts(small, p); got != nil {
		t.Errorf("half a device-hour flagged: %+v", got)
	}
	enough := []FirmwareStats{{Model: "gw-100", Firmware: "1.0.3", Devices: 3, DeviceHours: 1, PingDisconnects: 5}}
	if got := LearnVerdicts(enough, p); len(got) != 1 {
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
