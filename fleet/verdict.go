package fleet

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// pingDetailPrefix starts the detail of a protocol error caused by a PINGREQ,
// as the broker's classifier names the packet ("PINGREQ with reserved flags 0x2").
const pingDetailPrefix = "PINGREQ"

// IsPingDisconnect reports whether a disconnect event counts as ping-related:
// the broker dropped a malformed PINGREQ (a protocol_error whose detail starts
// with "PINGREQ", as the broker's classifier writes it), or the keepalive
// deadline passed in a session that never sent a PINGREQ. SQL that aggregates
// events into FirmwareStats must count exactly these events:
//
//	kind = 'disconnect' AND ((reason = 'protocol_error' AND detail LIKE 'PINGREQ%')
//	                      OR (reason = 'keepalive_timeout' AND pings = 0))
//
// A keepalive timeout with zero pings can also come from a healthy device
// that publishes often enough never to need a PINGREQ and then loses its
// network; that is why verdicts compare a firmware with the rest of the fleet
// rather than count such events alone.
func IsPingDisconnect(e Event) bool {
	if e.Kind != KindDisconnect {
		return false
	}
	switch e.Reason {
	case ReasonProtocolError:
		return strings.HasPrefix(e.Detail, pingDetailPrefix)
	case ReasonKeepaliveTimeout:
		return e.Pings == 0
	}
	return false
}

// FirmwareStats is what the fleet saw of one (model, firmware) group during
// the learning window. The store aggregates it; LearnVerdicts judges it.
type FirmwareStats struct {
	Model, Firmware string
	// Devices counts distinct devices seen on this firmware in the window.
	Devices int
	// DeviceHours sums the time those devices were connected in the window.
	DeviceHours float64
	// PingDisconnects counts the events for which IsPingDisconnect holds.
	PingDisconnects int
	// Sessions counts the sessions that ended in the window.
	Sessions int
	// Samples are a few example ping-related events kept as evidence; the
	// caller decides how many.
	Samples []Event
}

// VerdictPolicy decides how much evidence flags a firmware. Every minimum
// must hold: a handful of disconnects on two devices is bad luck, not a
// firmware bug, and a wrong flag would mark devices incompatible and let a
// campaign upgrade them.
type VerdictPolicy struct {
	// MinDevices is the fewest distinct devices on the firmware.
	MinDevices int `json:"min_devices"`
	// MinDeviceHours is the least connected time on the firmware.
	MinDeviceHours float64 `json:"min_device_hours"`
	// MinEvents is the fewest ping-related disconnects on the firmware.
	MinEvents int `json:"min_events"`
	// MinRate is an absolute floor in ping-related disconnects per
	// device-hour: below it nothing is flagged, however the rest compares.
	MinRate float64 `json:"min_rate"`
	// RateRatio flags a firmware whose rate is at least this multiple of the
	// rest of the fleet's. When the rest's rate is 0 the floor alone decides.
	RateRatio float64 `json:"rate_ratio"`
}

// DefaultVerdictPolicy returns the production policy. Firmware that rejects
// pings drops about once per 1.5 × keepalive (40 times a device-hour at a
// 60 s keepalive, 8 at 300 s), while a healthy fleet sees a ping-related
// disconnect far less than once a device-hour; so a floor of 1 per
// device-hour, five times the rest of the fleet, over at least 3 devices, 5
// events and 1 device-hour separates the two with room to spare.
func DefaultVerdictPolicy() VerdictPolicy {
	return VerdictPolicy{MinDevices: 3, MinDeviceHours: 1, MinEvents: 5, MinRate: 1, RateRatio: 5}
}

// Verdict flags a firmware, with the numbers that convinced LearnVerdicts.
type Verdict struct {
	Model    string `json:"model"`
	Firmware string `json:"firmware"`
	// Flag is IncompatRejectsPings.
	Flag string `json:"flag"`
	// Rate is the firmware's ping-related disconnects per device-hour.
	Rate float64 `json:"rate"`
	// FleetRate is the same for every other (model, firmware) group pooled.
	FleetRate       float64 `json:"fleet_rate"`
	Devices         int     `json:"devices"`
	DeviceHours     float64 `json:"device_hours"`
	PingDisconnects int     `json:"ping_disconnects"`
	// Evidence says the above in one sentence for an operator.
	Evidence string  `json:"evidence"`
	Samples  []Event `json:"samples,omitempty"`
}

// Incompatibility is what the verdict means for each device on its firmware,
// in the form Diagnose and the device views take.
func (v Verdict) Incompatibility() Incompatibility {
	return Incompatibility{Reason: v.Flag,
		Detail: fmt.Sprintf("firmware %s of %s rejects pings: %s", v.Firmware, modelPhrase(v.Model), v.Evidence)}
}

// LearnVerdicts flags the firmware whose ping-related disconnect rate stands
// out from the rest of the fleet. Each group is compared with every other
// group pooled, never with itself, so one bad firmware cannot raise the bar it
// is measured against.
//
// A fleet where every firmware is equally bad flags nothing: the ratio test
// fails whatever the absolute rate, because when all firmware drop alike the
// cause is elsewhere (the network, the broker, a shared keepalive setting)
// and upgrading would not help; per-device diagnosis still shows the
// problem. Only when the rest of the fleet has no ping-related disconnects at
// all (or there is no rest) does the absolute floor alone decide.
//
// Stats for the same (model, firmware) are merged. Verdicts come sorted by
// model, then firmware.
func LearnVerdicts(stats []FirmwareStats, p VerdictPolicy) []Verdict {
	groups := mergeStats(stats)
	var totalHours float64
	var totalPD int
	for _, g := range groups {
		totalHours += g.DeviceHours
		totalPD += g.PingDisconnects
	}
	var out []Verdict
	for _, g := range groups {
		if g.Devices < p.MinDevices || g.DeviceHours < p.MinDeviceHours || g.DeviceHours <= 0 ||
			g.PingDisconnects < max(p.MinEvents, 1) {
			continue
		}
		rate := float64(g.PingDisconnects) / g.DeviceHours
		restHours, restPD := totalHours-g.DeviceHours, totalPD-g.PingDisconnects
		var fleetRate float64
		if restHours > 0 {
			fleetRate = float64(restPD) / restHours
		}
		if rate < p.MinRate || (fleetRate > 0 && rate < p.RateRatio*fleetRate) {
			continue
		}
		out = append(out, Verdict{
			Model: g.Model, Firmware: g.Firmware, Flag: IncompatRejectsPings,
			Rate: rate, FleetRate: fleetRate,
			Devices: g.Devices, DeviceHours: g.DeviceHours, PingDisconnects: g.PingDisconnects,
			Evidence: fmt.Sprintf("%d ping-related disconnects over %d devices and %s device-hours (%s/device-hour) vs %s/device-hour for the rest of the fleet",
				g.PingDisconnects, g.Devices, formatRate(g.DeviceHours), formatRate(rate), formatRate(fleetRate)),
			Samples: g.Samples,
		})
	}
	return out
}

// mergeStats sums the stats of each (model, firmware) and sorts the groups.
func mergeStats(stats []FirmwareStats) []FirmwareStats {
	type key struct{ model, firmware string }
	idx := map[key]int{}
	var groups []FirmwareStats
	for _, s := range stats {
		k := key{s.Model, s.Firmware}
		i, ok := idx[k]
		if !ok {
			idx[k] = len(groups)
			s.Samples = slices.Clip(s.Samples)
			groups = append(groups, s)
			continue
		}
		g := &groups[i]
		g.Devices += s.Devices
		g.DeviceHours += s.DeviceHours
		g.PingDisconnects += s.PingDisconnects
		g.Sessions += s.Sessions
		g.Samples = append(g.Samples, s.Samples...)
	}
	slices.SortFunc(groups, func(a, b FirmwareStats) int {
		return cmp.Or(cmp.Compare(a.Model, b.Model), cmp.Compare(a.Firmware, b.Firmware))
	})
	return groups
}

// formatRate prints a rate with as many digits as an operator needs: "12",
// "4.0", "0.12", "0.0031".
func formatRate(r float64) string {
	switch {
	case r == 0:
		return "0"
	case r >= 10:
		return fmt.Sprintf("%.0f", r)
	case r >= 1:
		return fmt.Sprintf("%.1f", r)
	}
	return fmt.Sprintf("%.2g", r)
}
