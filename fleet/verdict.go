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
	// MinDeviceHours is the least connected time on the firmware. It also
	// decides which other firmware make up the baseline: only those with at
	// least this much connected time have a rate worth comparing with.
	MinDeviceHours float64 `json:"min_device_hours"`
	// MinEvents is the fewest ping-related disconnects on the firmware.
	MinEvents int `json:"min_events"`
	// MinRate is an absolute floor in ping-related disconnects per
	// device-hour: below it nothing is flagged, however the rest compares.
	MinRate float64 `json:"min_rate"`
	// RateRatio flags a firmware whose rate is at least this multiple of the
	// baseline (see LearnVerdicts). When the baseline is 0 the floor alone
	// decides.
	RateRatio float64 `json:"rate_ratio"`
	// ClearFraction is the hysteresis of a flag: a firmware flagged before
	// stays flagged until its rate falls below this fraction of the
	// thresholds that flagged it (ClearFraction × MinRate, ClearFraction ×
	// RateRatio × baseline) or its evidence ages out. Without it a firmware
	// whose rate sits at the threshold is flagged and cleared at every
	// analysis, and its devices flip between compatible and incompatible
	// (and in and out of campaigns) with the noise of a few disconnects.
	// It is in (0, 1]; 1 means no hysteresis.
	ClearFraction float64 `json:"clear_fraction"`
}

// DefaultVerdictPolicy returns the production policy. Firmware that rejects
// pings drops about once per 1.5 × keepalive (40 times a device-hour at a
// 60 s keepalive, 8 at 300 s), while a healthy fleet sees a ping-related
// disconnect far less than once a device-hour; so a floor of 1 per
// device-hour, five times the baseline, over at least 3 devices, 5 events
// and 1 device-hour separates the two with room to spare. A flagged
// firmware clears below 0.6 of that (0.6 per device-hour, three times the
// baseline): a firmware that really rejects pings stays far above it, and
// one that was flagged on a borderline rate must get clearly better, not
// just one disconnect better, before its devices count as compatible again.
func DefaultVerdictPolicy() VerdictPolicy {
	return VerdictPolicy{MinDevices: 3, MinDeviceHours: 1, MinEvents: 5, MinRate: 1, RateRatio: 5, ClearFraction: 0.6}
}

// FirmwareKey names a (model, firmware) group.
type FirmwareKey struct {
	Model, Firmware string
}

// Verdict flags a firmware, with the numbers that convinced LearnVerdicts.
type Verdict struct {
	Model    string `json:"model"`
	Firmware string `json:"firmware"`
	// Flag is IncompatRejectsPings.
	Flag string `json:"flag"`
	// Rate is the firmware's ping-related disconnects per device-hour.
	Rate float64 `json:"rate"`
	// FleetRate is the baseline the rate was compared with: the lower median
	// of the rates of the other (model, firmware) groups with at least
	// MinDeviceHours, or, when no other group has that much, every other
	// group pooled.
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

// Learned is what LearnVerdicts concluded.
type Learned struct {
	// Flagged are the verdicts in force, sorted by model, then firmware.
	Flagged []Verdict
	// Cleared are the groups of the flagged set given to LearnVerdicts that
	// are no longer flagged, sorted likewise, with the numbers that cleared
	// them; their Evidence says why.
	Cleared []Verdict
}

// LearnVerdicts flags the firmware whose ping-related disconnect rate stands
// out from the rest of the fleet. flagged is the set of groups flagged by
// the previous analysis (learned, whatever an operator decided); it makes the
// verdicts stable.
//
// A group is compared with a baseline made of the other groups, never of
// itself: the lower median of the rates of the other groups with at least
// MinDeviceHours of connected time. A median, because one bad firmware
// must not raise the bar another bad one is measured against (with two other
// groups at 0 and 40 disconnects a device-hour the baseline is 0, not their
// pooled rate); the lower one, so that with two other groups the healthier
// decides. When no other group has that much connected time, the baseline
// is every other group pooled.
//
// A group not flagged before is flagged when every minimum of the policy
// holds and its rate is at least MinRate and at least RateRatio × the
// baseline. A group flagged before stays flagged while it still has evidence
// in the window (a ping-related disconnect, connected time, a device) and
// its rate is at least ClearFraction × those two thresholds; the minimums no
// longer apply. So a firmware whose rate hovers at the threshold flips once,
// not at every analysis.
//
// A fleet where every firmware is equally bad flags nothing: the baseline is
// then the firmware's own rate, so the ratio test fails whatever the
// absolute rate (as long as RateRatio > 1, and for a firmware flagged before
// as long as ClearFraction × RateRatio > 1, 3 by default), because when all
// firmware drop alike the cause is elsewhere (the network, the broker, a
// shared keepalive setting) and upgrading would not help; per-device
// diagnosis still shows the problem. Only when the baseline is 0 (most other
// firmware have no ping-related disconnects at all, or there is no other
// firmware) does the absolute floor alone decide.
//
// Stats for the same (model, firmware) are merged.
func LearnVerdicts(stats []FirmwareStats, flagged map[FirmwareKey]bool, p VerdictPolicy) Learned {
	groups := mergeStats(stats)
	var totalHours float64
	var totalPD int
	var rates []float64 // of the groups that can be a baseline, sorted
	for _, g := range groups {
		totalHours += g.DeviceHours
		totalPD += g.PingDisconnects
		if inBaseline(g, p) {
			rates = append(rates, groupRate(g))
		}
	}
	slices.Sort(rates)
	var out Learned
	seen := map[FirmwareKey]bool{}
	for _, g := range groups {
		k := FirmwareKey{g.Model, g.Firmware}
		seen[k] = true
		b := baselineOf(g, p, rates, totalPD-g.PingDisconnects, totalHours-g.DeviceHours)
		v, ok := judgeGroup(g, b, flagged[k], p)
		switch {
		case ok:
			out.Flagged = append(out.Flagged, v)
		case flagged[k]:
			out.Cleared = append(out.Cleared, v)
		}
	}
	// A flagged group without a single session in the window is cleared too.
	for k, was := range flagged {
		if !was || seen[k] {
			continue
		}
		g := FirmwareStats{Model: k.Model, Firmware: k.Firmware}
		v, _ := judgeGroup(g, baselineOf(g, p, rates, totalPD, totalHours), true, p)
		out.Cleared = append(out.Cleared, v)
	}
	slices.SortFunc(out.Cleared, func(a, b Verdict) int {
		return cmp.Or(cmp.Compare(a.Model, b.Model), cmp.Compare(a.Firmware, b.Firmware))
	})
	return out
}

// baseline is what a group's rate is compared with.
type baseline struct {
	rate float64
	// median is false when no other group had enough connected time and the
	// rate is every other group pooled.
	median bool
}

// inBaseline reports whether a group has enough connected time for its rate
// to count in the baseline of the others.
func inBaseline(g FirmwareStats, p VerdictPolicy) bool {
	return g.DeviceHours > 0 && g.DeviceHours >= p.MinDeviceHours
}

func groupRate(g FirmwareStats) float64 {
	if g.DeviceHours <= 0 {
		return 0
	}
	return float64(g.PingDisconnects) / g.DeviceHours
}

// baselineOf returns the lower median of the sorted baseline rates without
// g's own, or the pooled rate of the rest (restPD over restHours) when no
// other group is in the baseline.
func baselineOf(g FirmwareStats, p VerdictPolicy, rates []float64, restPD int, restHours float64) baseline {
	n, self := len(rates), -1
	if inBaseline(g, p) {
		// g's rate is in rates, computed the same way: leave one copy out.
		self, _ = slices.BinarySearch(rates, groupRate(g))
		n--
	}
	if n <= 0 {
		var pooled float64
		if restHours > 0 {
			pooled = float64(restPD) / restHours
		}
		return baseline{rate: pooled}
	}
	i := (n - 1) / 2
	if self >= 0 && i >= self {
		i++
	}
	return baseline{rate: rates[i], median: true}
}

// judgeGroup decides one group: ok when it is flagged (newly, or still
// because it was flagged before), else the verdict that clears it.
func judgeGroup(g FirmwareStats, b baseline, was bool, p VerdictPolicy) (v Verdict, ok bool) {
	rate := groupRate(g)
	threshold := max(p.MinRate, p.RateRatio*b.rate)
	clearBelow := p.ClearFraction * threshold
	v = Verdict{
		Model: g.Model, Firmware: g.Firmware, Flag: IncompatRejectsPings,
		Rate: rate, FleetRate: b.rate,
		Devices: g.Devices, DeviceHours: g.DeviceHours, PingDisconnects: g.PingDisconnects,
		Samples: g.Samples,
	}
	against := ", the median of the other firmware"
	if !b.median {
		against = " for the rest of the fleet"
	}
	numbers := fmt.Sprintf("%d ping-related disconnects over %d devices and %s device-hours (%s/device-hour) vs %s/device-hour%s",
		g.PingDisconnects, g.Devices, formatRate(g.DeviceHours), formatRate(rate), formatRate(b.rate), against)
	evidence := g.PingDisconnects >= 1 && g.DeviceHours > 0 && g.Devices >= 1
	switch {
	case evidence && g.Devices >= p.MinDevices && g.DeviceHours >= p.MinDeviceHours &&
		g.PingDisconnects >= p.MinEvents && rate >= threshold:
		v.Evidence = numbers
		return v, true
	case !was:
		return v, false
	case !evidence:
		v.Evidence = fmt.Sprintf("the evidence has aged out of the verdict window (%d ping-related disconnects over %d devices and %s device-hours left)",
			g.PingDisconnects, g.Devices, formatRate(g.DeviceHours))
		return v, false
	case rate >= clearBelow:
		why := "too small a sample to flag"
		if rate < threshold {
			why = "below the threshold of " + formatRate(threshold) + "/device-hour"
		}
		v.Evidence = fmt.Sprintf("%s: %s but flagged before, so it stays flagged down to %s/device-hour", numbers, why, formatRate(clearBelow))
		return v, true
	}
	v.Evidence = fmt.Sprintf("%s: below %s/device-hour (%g × the threshold of %s/device-hour), so the flag clears",
		numbers, formatRate(clearBelow), p.ClearFraction, formatRate(threshold))
	return v, false
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
