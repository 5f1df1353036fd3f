package fleet

import (
	"cmp"
	"fmt"
	"slices"
	"time"
)

// WiFi link diagnosis: many drops come from the radio link, not the
// firmware. Every disconnect carries the link its session last reported
// (SessionLink, from the device's telemetry), so a device's own events tell
// a weak signal and drops on roaming apart, and the fleet's rates per channel
// and per access point (LinkStats, from link_rollups_hour) tell a congested
// channel and a bad access point apart from the devices on them.

// Link problem codes, reported after the device's other problems.
const (
	ProblemWeakSignal       = "weak_signal"
	ProblemCongestedChannel = "congested_channel"
	ProblemBadAccessPoint   = "bad_access_point"
	ProblemRoamingDrops     = "roaming_drops"
)

// RoamDropWindow is how soon after a change of access point a lost
// connection counts as lost on the roam: clients that lose their sessions on
// a hand-over do so within seconds.
const RoamDropWindow = 30 * time.Second

// LostOnLink reports whether a disconnect is the kind a radio link causes:
// the connection broke (connection_lost) or fell silent (keepalive_timeout).
// Clean ends, takeovers, refusals and protocol errors are not the link's.
func LostOnLink(e Event) bool {
	return e.Kind == KindDisconnect && (e.Reason == ReasonConnectionLost || e.Reason == ReasonKeepaliveTimeout)
}

// LinkPolicy holds the thresholds of the link rules, in the policy document
// (PUT /api/v1/compat/rules, field "link"); zero fields take the defaults
// (DefaultLinkPolicy).
type LinkPolicy struct {
	// WeakRSSIdBm: a session lost while its RSSI was below this ended on a
	// weak signal (default -75 dBm).
	WeakRSSIdBm int `json:"weak_rssi_dbm"`
	// WeakShare is the least share of a device's lost sessions that must
	// end below WeakRSSIdBm for weak_signal (default 0.6).
	WeakShare float64 `json:"weak_share"`
	// RoamShare is the least share of a device's lost sessions that must
	// end on a change of access point for roaming_drops (default 0.5).
	RoamShare float64 `json:"roam_share"`
	// MinDeviceLost is the fewest lost sessions with a link report that
	// show a device's pattern (default 3).
	MinDeviceLost int `json:"min_device_lost"`
	// ChannelRatio: a channel whose devices lose sessions this many times
	// more per device-hour than the rest of the fleet is congested
	// (default 3). AccessPointRatio is the same for an access point against
	// the devices of the same model elsewhere (default 3).
	ChannelRatio     float64 `json:"channel_ratio"`
	AccessPointRatio float64 `json:"access_point_ratio"`
	// MinGroupLost and MinGroupDeviceHours are the least evidence a channel
	// or an access point needs before it is judged (default 5 lost sessions
	// and 0.5 device-hours).
	MinGroupLost        int     `json:"min_group_lost"`
	MinGroupDeviceHours float64 `json:"min_group_device_hours"`
	// WindowSeconds is how far back the fleet's link rates look (default a
	// day).
	WindowSeconds int `json:"window_seconds"`
}

// DefaultLinkPolicy returns the default thresholds. -75 dBm is where WiFi
// links commonly start losing frames; 0.6 of the lost sessions is a clear
// majority; three times the rest of the fleet is well above what chance
// makes of a handful of devices.
func DefaultLinkPolicy() LinkPolicy {
	return LinkPolicy{WeakRSSIdBm: -75, WeakShare: 0.6, RoamShare: 0.5, MinDeviceLost: 3, ChannelRatio: 3, AccessPointRatio: 3,
		MinGroupLost: 5, MinGroupDeviceHours: 0.5, WindowSeconds: 86400}
}

// withDefaults fills in the zero fields.
func (l LinkPolicy) withDefaults() LinkPolicy {
	d := DefaultLinkPolicy()
	orDefault(&l.WeakRSSIdBm, d.WeakRSSIdBm)
	orDefault(&l.WeakShare, d.WeakShare)
	orDefault(&l.RoamShare, d.RoamShare)
	orDefault(&l.MinDeviceLost, d.MinDeviceLost)
	orDefault(&l.ChannelRatio, d.ChannelRatio)
	orDefault(&l.AccessPointRatio, d.AccessPointRatio)
	orDefault(&l.MinGroupLost, d.MinGroupLost)
	orDefault(&l.MinGroupDeviceHours, d.MinGroupDeviceHours)
	orDefault(&l.WindowSeconds, d.WindowSeconds)
	return l
}

func orDefault[T comparable](v *T, d T) {
	var zero T
	if *v == zero {
		*v = d
	}
}

// validate names the first field out of range.
func (l LinkPolicy) validate() error {
	switch {
	case l.WeakRSSIdBm != 0 && (l.WeakRSSIdBm < -100 || l.WeakRSSIdBm > -30):
		return invalid("link.weak_rssi_dbm", "must be between -100 and -30 dBm")
	case l.WeakShare < 0 || l.WeakShare > 1:
		return invalid("link.weak_share", "must be between 0 and 1")
	case l.RoamShare < 0 || l.RoamShare > 1:
		return invalid("link.roam_share", "must be between 0 and 1")
	case l.MinDeviceLost < 0:
		return invalid("link.min_device_lost", "must not be negative")
	case l.ChannelRatio < 0 || (l.ChannelRatio > 0 && l.ChannelRatio < 1):
		return invalid("link.channel_ratio", "must be at least 1")
	case l.AccessPointRatio < 0 || (l.AccessPointRatio > 0 && l.AccessPointRatio < 1):
		return invalid("link.access_point_ratio", "must be at least 1")
	case l.MinGroupLost < 0:
		return invalid("link.min_group_lost", "must not be negative")
	case l.MinGroupDeviceHours < 0:
		return invalid("link.min_group_device_hours", "must not be negative")
	case l.WindowSeconds < 0 || l.WindowSeconds > 90*86400:
		return invalid("link.window_seconds", "must be between 0 and 7776000 (90 days)")
	}
	return nil
}

// weak reports whether a lost session ended on a weak signal.
func (l LinkPolicy) weak(e Event) bool { return e.RSSI != 0 && e.RSSI < l.WeakRSSIdBm }

// roamedAtEnd reports whether a session ended within RoamDropWindow of a
// change of access point it reported.
func roamedAtEnd(e Event) bool {
	return e.RoamMillis >= 1 && e.RoamMillis <= RoamDropWindow.Milliseconds()
}

// LinkRate is the lost sessions per device-hour of one channel or access
// point over the window, against the rest it is compared with.
type LinkRate struct {
	Channel int    `json:"channel,omitempty"`
	Band    string `json:"band,omitempty"` // as the devices on it report it now
	BSSID   string `json:"bssid,omitempty"`
	SSID    string `json:"ssid,omitempty"`
	Model   string `json:"model,omitempty"`
	// Devices reporting it now (their latest telemetry).
	Devices int `json:"devices"`
	// DeviceHours connected on it (ended sessions by the link they ended
	// on, live sessions by the link they report).
	DeviceHours float64 `json:"device_hours"`
	// Disconnects are the sessions lost on it, not counting those a weak
	// signal or a roam explains (they are the devices' own problems).
	Disconnects   int64   `json:"disconnects"`
	PerDeviceHour float64 `json:"per_device_hour"`
	// Ratio is PerDeviceHour over the baseline (the lower median of the
	// others' rates, see linkBaseline): the other channels' for a channel; for
	// an access point, the same model's other access points' on channels
	// that are not congested (on a congested channel: the same model's
	// others on that channel).
	Ratio float64 `json:"ratio"`
	// AccessPoints on a channel (those with sessions in the window).
	AccessPoints int `json:"access_points,omitempty"`
	// Flagged by the policy: Congested for a channel, Bad for an access
	// point.
	Flagged   bool `json:"-"`
	Congested bool `json:"congested,omitempty"`
	Bad       bool `json:"bad,omitempty"`
}

// LinkStats is the fleet's radio links over a window: rates per channel and
// per access point, which of them are flagged, and how many lost sessions
// each cause explains.
type LinkStats struct {
	WindowSeconds int        `json:"window_seconds"`
	WeakRSSIdBm   int        `json:"weak_rssi_dbm"`
	Channels      []LinkRate `json:"channels"`
	AccessPoints  []LinkRate `json:"access_points"`
	// Causes counts the window's lost sessions by the cause that explains
	// them: weak_signal, roaming, congested_channel, bad_access_point
	// (lost on a flagged channel or access point), firmware (ping-related
	// disconnects, the firmware's cause the verdicts learn), unexplained.
	Causes map[string]int64 `json:"causes"`
	// Dominant is "link" when the link causes explain more lost sessions
	// than the firmware, "firmware" when the firmware explains more, "none"
	// when neither explains any.
	Dominant string `json:"dominant"`
}

// linkCell is one row of link_rollups_hour summed over the window.
type linkCell struct {
	model, bssid   string
	channel, rssi  int // rssi: the 5 dB bucket, 0 = not reported
	lost, roamLost int64
	hours          float64
}

// liveLink is the connected time of live sessions on a link.
type liveLink struct {
	model, bssid string
	channel      int
	hours        float64
}

// currentLink is how many devices report a link now.
type currentLink struct {
	model, bssid, band, ssid string
	channel, devices         int
}

// linkRate is lost sessions per device-hour.
func linkRate(lost int64, hours float64) float64 {
	if hours <= 0 {
		return 0
	}
	return float64(lost) / hours
}

// linkBaseline is the rate a group is compared with: the lower median of the
// others' rates, among those with at least minHours (so that one group that
// is bad too does not raise the bar, as with the firmware verdicts); when
// none has, the others pooled. Its floor is one lost session over the
// others' hours, so that a ratio against a clean rest stays finite and
// modest evidence is not inflated.
func linkBaseline(others []*LinkRate, minHours float64) float64 {
	var rates []float64
	var hours float64
	var lost int64
	for _, o := range others {
		hours += o.DeviceHours
		lost += o.Disconnects
		if o.DeviceHours >= minHours && o.DeviceHours > 0 {
			rates = append(rates, o.PerDeviceHour)
		}
	}
	if hours <= 0 {
		return 0
	}
	b := linkRate(lost, hours)
	if len(rates) > 0 {
		slices.Sort(rates)
		b = rates[(len(rates)-1)/2]
	}
	return max(b, 1/hours)
}

// againstBaseline is rate over base, 0 without a baseline (no other group
// to compare with).
func againstBaseline(rate, base float64) float64 {
	if base <= 0 {
		return 0
	}
	return rate / base
}

// judgeLinks computes LinkStats from the window's rollup cells, the live
// sessions and the devices' current links. Lost sessions a weak signal or a
// roam explains do not count against their channel or access point: a device
// far from its access point would otherwise make the access point look bad.
// A channel is congested only when it still stands out without its worst
// access point (so it needs two: one access point alone cannot tell the
// channel from the access point, and is judged as an access point); an
// access point on a congested channel is bad only if it also stands out from
// the same model's others on that channel.
func judgeLinks(cells []linkCell, live []liveLink, current []currentLink, pingLost int64, lp LinkPolicy) LinkStats {
	st := LinkStats{WindowSeconds: lp.WindowSeconds, WeakRSSIdBm: lp.WeakRSSIdBm, Channels: []LinkRate{}, AccessPoints: []LinkRate{},
		Causes: map[string]int64{}}
	type apKey struct {
		model, bssid string
		channel      int
	}
	type sum struct {
		lost  int64
		hours float64
	}
	chans := map[int]*LinkRate{}
	aps := map[apKey]*LinkRate{}
	chanAPs := map[int]map[string]sum{} // per channel, per access point
	addAP := func(c int, bssid string, lost int64, hours float64) {
		if chanAPs[c] == nil {
			chanAPs[c] = map[string]sum{}
		}
		s := chanAPs[c][bssid]
		chanAPs[c][bssid] = sum{s.lost + lost, s.hours + hours}
	}
	ch := func(c int) *LinkRate {
		if chans[c] == nil {
			chans[c] = &LinkRate{Channel: c}
		}
		return chans[c]
	}
	ap := func(k apKey) *LinkRate {
		if aps[k] == nil {
			aps[k] = &LinkRate{Channel: k.channel, BSSID: k.bssid, Model: k.model}
		}
		return aps[k]
	}
	var linkLost int64
	for _, c := range cells {
		// The bucket holds [rssi, rssi+5): below the threshold when its top is.
		weak := c.rssi != 0 && c.rssi+5 <= lp.WeakRSSIdBm
		counted := c.lost - c.roamLost
		if weak {
			st.Causes["weak_signal"] += c.lost
			linkLost += c.lost
			counted = 0
		} else {
			st.Causes["roaming"] += c.roamLost
			linkLost += c.roamLost
		}
		if c.channel != 0 {
			r := ch(c.channel)
			r.DeviceHours += c.hours
			r.Disconnects += counted
			if c.bssid != "" {
				addAP(c.channel, c.bssid, counted, c.hours)
			}
		}
		if c.bssid != "" {
			r := ap(apKey{c.model, c.bssid, c.channel})
			r.DeviceHours += c.hours
			r.Disconnects += counted
		}
	}
	for _, l := range live {
		if l.channel != 0 {
			ch(l.channel).DeviceHours += l.hours
			if l.bssid != "" {
				addAP(l.channel, l.bssid, 0, l.hours)
			}
		}
		if l.bssid != "" {
			ap(apKey{l.model, l.bssid, l.channel}).DeviceHours += l.hours
		}
	}
	for _, c := range current {
		if c.channel != 0 {
			r := ch(c.channel)
			r.Devices += c.devices
			r.Band = cmp.Or(r.Band, c.band)
		}
		if c.bssid != "" {
			r := ap(apKey{c.model, c.bssid, c.channel})
			r.Devices += c.devices
			r.Band, r.SSID = cmp.Or(r.Band, c.band), cmp.Or(r.SSID, c.ssid)
		}
	}
	enough := func(r *LinkRate) bool {
		return r.Disconnects >= int64(lp.MinGroupLost) && r.DeviceHours >= lp.MinGroupDeviceHours
	}
	// Channels: each against the lower median of the other channels' rates.
	var chanList []*LinkRate
	for c, r := range chans {
		r.PerDeviceHour = linkRate(r.Disconnects, r.DeviceHours)
		r.AccessPoints = len(chanAPs[c])
		chanList = append(chanList, r)
	}
	for _, r := range chanList {
		others := slices.DeleteFunc(slices.Clone(chanList), func(o *LinkRate) bool { return o == r })
		base := linkBaseline(others, lp.MinGroupDeviceHours)
		r.Ratio = againstBaseline(r.PerDeviceHour, base)
		// Congestion slows every access point on the channel: without its
		// worst access point the channel must still stand out, or the
		// excess is that access point's.
		var worst sum
		for _, a := range chanAPs[r.Channel] {
			if linkRate(a.lost, a.hours) > linkRate(worst.lost, worst.hours) {
				worst = a
			}
		}
		rest := againstBaseline(linkRate(r.Disconnects-worst.lost, r.DeviceHours-worst.hours), base)
		r.Flagged = enough(r) && r.AccessPoints >= 2 && r.Ratio >= lp.ChannelRatio && rest >= lp.ChannelRatio
		if r.Flagged {
			st.Causes["congested_channel"] += r.Disconnects
			linkLost += r.Disconnects
		}
	}
	// Access points: each against the lower median of the same model's
	// other access points on channels that are not congested ("elsewhere":
	// a congested channel's drops are the channel's, and would hide an
	// access point that is bad on its own); on a congested channel, against
	// the same model's others on that channel.
	congested := func(c int) bool { return chans[c] != nil && chans[c].Flagged }
	var apList []*LinkRate
	for _, r := range aps {
		r.PerDeviceHour = linkRate(r.Disconnects, r.DeviceHours)
		apList = append(apList, r)
	}
	for _, r := range apList {
		others := slices.DeleteFunc(slices.Clone(apList), func(o *LinkRate) bool {
			return o == r || o.Model != r.Model || congested(o.Channel) != congested(r.Channel) ||
				(congested(r.Channel) && o.Channel != r.Channel)
		})
		r.Ratio = againstBaseline(r.PerDeviceHour, linkBaseline(others, lp.MinGroupDeviceHours))
		r.Flagged = enough(r) && r.Ratio >= lp.AccessPointRatio
		if r.Flagged && !congested(r.Channel) {
			st.Causes["bad_access_point"] += r.Disconnects
			linkLost += r.Disconnects
		}
	}
	for _, r := range chans {
		r.Congested = r.Flagged
		st.Channels = append(st.Channels, *r)
	}
	for _, r := range aps {
		r.Bad = r.Flagged
		st.AccessPoints = append(st.AccessPoints, *r)
	}
	byRatio := func(a, b LinkRate) int {
		return cmp.Or(cmp.Compare(b.Ratio, a.Ratio), cmp.Compare(a.Channel, b.Channel), cmp.Compare(a.Model, b.Model), cmp.Compare(a.BSSID, b.BSSID))
	}
	slices.SortFunc(st.Channels, byRatio)
	slices.SortFunc(st.AccessPoints, byRatio)
	st.Causes["firmware"] = pingLost
	switch {
	case linkLost == 0 && pingLost == 0:
		st.Dominant = "none"
	case linkLost >= pingLost:
		st.Dominant = "link"
	default:
		st.Dominant = "firmware"
	}
	return st
}

// DiagnoseLink applies the link rules to a device's recent events (any
// order, already bounded to the diagnosis window) against the fleet's link
// stats. It returns nil when the device's drops are not the link's.
func DiagnoseLink(evs []Event, st LinkStats, p LinkPolicy) []Problem {
	p = p.withDefaults()
	evs = slices.Clone(evs)
	slices.SortStableFunc(evs, func(a, b Event) int { return a.At.Compare(b.At) })
	// The sessions the device reported a link in, in order: a lost one is
	// lost on a roam when its access point changed just before its end, or
	// the next session started on another access point than it ended on.
	var ended []Event
	for _, e := range evs {
		if e.Kind == KindDisconnect && e.Reported() {
			ended = append(ended, e)
		}
	}
	var lost, weak, roamed, counted []Event
	for i, e := range ended {
		if !LostOnLink(e) {
			continue
		}
		lost = append(lost, e)
		switch {
		case p.weak(e):
			weak = append(weak, e)
		case roamedAtEnd(e) || (i+1 < len(ended) && ended[i+1].FirstBSSID != "" && e.BSSID != "" && ended[i+1].FirstBSSID != e.BSSID):
			roamed = append(roamed, e)
		default:
			counted = append(counted, e)
		}
	}
	var out []Problem
	if pr := weakSignal(ended, lost, weak, p); pr != nil {
		out = append(out, *pr)
	}
	out = append(out, linkGroups(counted, st)...)
	if len(lost) >= p.MinDeviceLost && len(roamed) >= 2 && float64(len(roamed)) >= p.RoamShare*float64(len(lost)) {
		aps := map[string]bool{}
		for _, e := range roamed {
			aps[e.BSSID] = true
		}
		out = append(out, Problem{Code: ProblemRoamingDrops,
			Cause: fmt.Sprintf("%d of its %d lost connections ended when it changed access point", len(roamed), len(lost)),
			Evidence: map[string]any{"lost_sessions": len(lost), "lost_on_roam": len(roamed), "access_points": sortedKeys(aps),
				"roam_window_s": RoamDropWindow.Seconds(), "last_at": roamed[len(roamed)-1].At},
			Fix: "the device loses its connection on every hand-over between access points: enable fast roaming (802.11r/k/v) on the network, " +
				"or raise the device's roaming threshold so that it roams less eagerly",
		})
	}
	return out
}

// weakSignal: most of the device's lost sessions ended below the weak
// threshold, and the sessions that ended above it (if any) lasted longer
// than those lost below it.
func weakSignal(ended, lost, weak []Event, p LinkPolicy) *Problem {
	if len(lost) < p.MinDeviceLost || float64(len(weak)) < p.WeakShare*float64(len(lost)) {
		return nil
	}
	var above []Event
	for _, e := range ended {
		if e.RSSI != 0 && !p.weak(e) {
			above = append(above, e)
		}
	}
	durWeak, durAbove := medianDuration(weak), medianDuration(above)
	if len(above) >= 2 && durAbove <= durWeak {
		return nil // ending below the threshold does not make sessions shorter
	}
	rssi := make([]int, len(weak))
	for i, e := range weak {
		rssi[i] = e.RSSI
	}
	slices.Sort(rssi)
	ev := map[string]any{"lost_sessions": len(lost), "lost_below_threshold": len(weak), "threshold_dbm": p.WeakRSSIdBm,
		"median_rssi_at_loss_dbm": rssi[len(rssi)/2], "median_session_below_s": durWeak.Seconds(), "last_at": weak[len(weak)-1].At}
	if len(above) > 0 {
		ev["median_session_above_s"] = durAbove.Seconds()
	}
	return &Problem{Code: ProblemWeakSignal,
		Cause:    fmt.Sprintf("%d of its %d lost connections ended while its signal was below %d dBm", len(weak), len(lost), p.WeakRSSIdBm),
		Evidence: ev,
		Fix: "improve the device's signal: move it or its access point, add an access point or an external antenna; " +
			"these drops are the radio link's, not the firmware's",
	}
}

// linkGroups names the flagged channel and access point the device lost
// sessions on; counted are its lost sessions that neither its weak signal
// nor a roam explains.
func linkGroups(counted []Event, st LinkStats) []Problem {
	chanLost, apLost := map[int]int{}, map[string]int{}
	for _, e := range counted {
		if e.Channel != 0 {
			chanLost[e.Channel]++
		}
		if e.BSSID != "" {
			apLost[e.Model+"\x00"+e.BSSID]++
		}
	}
	var out []Problem
	for _, c := range st.Channels {
		if n := chanLost[c.Channel]; c.Flagged && n > 0 {
			out = append(out, Problem{Code: ProblemCongestedChannel,
				Cause: fmt.Sprintf("channel %d is congested: its devices lose %.1f× as many connections per device-hour as the rest of the fleet", c.Channel, c.Ratio),
				Evidence: map[string]any{"channel": c.Channel, "lost_here": n, "channel_per_device_hour": round2(c.PerDeviceHour),
					"ratio": round2(c.Ratio), "channel_devices": c.Devices, "access_points": c.AccessPoints},
				Fix: fmt.Sprintf("move the access points off channel %d (on 2.4 GHz use 1, 6 or 11 with the least traffic) or move the devices to 5 GHz", c.Channel),
			})
			break
		}
	}
	for _, a := range st.AccessPoints {
		if n := apLost[a.Model+"\x00"+a.BSSID]; a.Flagged && n > 0 {
			out = append(out, Problem{Code: ProblemBadAccessPoint,
				Cause: fmt.Sprintf("access point %s loses %.1f× as many connections per device-hour as the other access points of %s devices", a.BSSID, a.Ratio, a.Model),
				Evidence: map[string]any{"bssid": a.BSSID, "channel": a.Channel, "lost_here": n, "ap_per_device_hour": round2(a.PerDeviceHour),
					"ratio": round2(a.Ratio), "ap_devices": a.Devices},
				Fix: fmt.Sprintf("check access point %s (firmware, power, placement, interference) or move its devices to another one", a.BSSID),
			})
			break
		}
	}
	return out
}

func medianDuration(evs []Event) time.Duration {
	if len(evs) == 0 {
		return 0
	}
	d := make([]int64, len(evs))
	for i, e := range evs {
		d[i] = e.DurationMillis
	}
	slices.Sort(d)
	return time.Duration(d[len(d)/2]) * time.Millisecond
}

func round2(f float64) float64 { return float64(int64(f*100+0.5)) / 100 }
