package fleet

import (
	"cmp"
	"fmt"
	"math"
	"net"
	"slices"
	"strings"
	"time"
)

// Problem codes, in the order Diagnose reports them: the most severe (the
// device cannot work on its firmware) first, the ones an operator fixes
// outside the device (credentials, certificates) last.
const (
	ProblemIncompatibleFirmware   = "incompatible_firmware"
	ProblemMalformedPings         = "malformed_pings"
	ProblemNoPings                = "no_pings"
	ProblemStalls                 = "stalls"
	ProblemOversizedPackets       = "oversized_packets"
	ProblemDuplicateClientID      = "duplicate_client_id"
	ProblemKeepaliveMismatch      = "keepalive_mismatch"
	ProblemThrottled              = "throttled"
	ProblemFlapping               = "flapping"
	ProblemTLSHandshakeFailures   = "tls_handshake_failures"
	ProblemAuthFailures           = "auth_failures"
	ProblemIDUsedElsewhere        = "id_used_elsewhere"
	ProblemDecommissionedRetrying = "decommissioned_retrying"
)

// Details the broker writes on refusals, so that rules can tell a device's
// own fault from one anyone could cause under its id.
const (
	// DetailReconnectsTooOften: the per-id connect limit, applied after the
	// device authenticated, so it is always the device's own doing.
	DetailReconnectsTooOften = "device reconnects too often"
	// DetailFailedAuthPrefix starts a refusal by the per-source limit on
	// failed authentications: unauthenticated, like any wrong token.
	DetailFailedAuthPrefix = "too many failed authentications"
	// DetailWriteTimeoutPrefix starts a lost connection the broker ended
	// because the device stopped reading what it was sent.
	DetailWriteTimeoutPrefix = "write timeout"
)

// Problem is one reason a device drops, written for an operator.
type Problem struct {
	// Code is one of the Problem* constants.
	Code string `json:"code"`
	// Cause says what is wrong in one sentence.
	Cause string `json:"cause"`
	// Evidence holds the numbers and sample values behind the cause: counts,
	// addresses, times, idle seconds.
	Evidence map[string]any `json:"evidence"`
	// Fix says what to do in one sentence.
	Fix string `json:"fix"`
	// Remedy, when set, is the configuration change that fixes the problem:
	// POST /api/v1/fixes applies it to the devices that have it.
	Remedy *Remedy `json:"remedy,omitempty"`
	// Cleared, when set, says why the problem is over although its evidence
	// is still in the window: the device's sessions since a change no longer
	// show it.
	Cleared string `json:"cleared,omitempty"`
}

// Remedy is a desired-configuration change: a JSON merge patch (RFC 7396)
// of the device's own configuration layer, such as {"keepalive_s": 15}.
type Remedy struct {
	Config map[string]any `json:"config"`
}

// ConfigKeepalive is the desired-configuration key of the keepalive a device
// asks for, in seconds (the device protocol's config documents).
const ConfigKeepalive = "keepalive_s"

// DiagnosisPolicy holds the thresholds of Diagnose's rules. Start from
// DefaultDiagnosisPolicy and change what you need: a zero Window considers
// every event given, a zero FlapWindow switches the flapping rule off.
type DiagnosisPolicy struct {
	// Window bounds the events considered: older than now-Window is ignored.
	Window time.Duration
	// FlapSessions: more than this many sessions started within FlapWindow
	// is flapping.
	FlapSessions int
	FlapWindow   time.Duration
	// TakeoverMin is the fewest session takeovers between differing IP
	// addresses that show two devices sharing a client id.
	TakeoverMin int
	// IdleCutMin is the fewest sessions lost at about the same idle time that
	// show something on the path cutting idle connections.
	IdleCutMin int
	// IdleCutTolerance is the relative spread around the median idle time
	// that still counts as "the same" (0.15 = ±15 %).
	IdleCutTolerance float64
	// IdleCutShare is the least share of the device's lost connections that
	// must end at that idle time: a path that cuts idle connections ends
	// nearly every session the same way, random drops do not.
	IdleCutShare float64
}

// DefaultDiagnosisPolicy returns the thresholds operators see by default. An
// hour of history is long enough to see a pattern and short enough that a
// fixed device looks healthy soon after. Seven sessions in ten minutes is
// more than any device reconnects by design. Two takeovers between different
// addresses, or two live sessions taking the id from each other, rule out a
// single reconnect racing its own stale session. Three sessions lost within
// ±15 % of one idle time, and at least half of all the device's lost
// connections, is a pattern that radio noise does not produce (random drops
// spread their idle times over the whole keepalive period, so a ±15 % band
// holds at most about a third of them), while NAT and load-balancer timers
// jitter by much less.
func DefaultDiagnosisPolicy() DiagnosisPolicy {
	return DiagnosisPolicy{
		Window:           time.Hour,
		FlapSessions:     6,
		FlapWindow:       10 * time.Minute,
		TakeoverMin:      2,
		IdleCutMin:       3,
		IdleCutTolerance: 0.15,
		IdleCutShare:     0.5,
	}
}

// Fixed thresholds of the rules whose evidence is unambiguous.
const (
	minNoPings         = 2 // one timeout without pings may be a device that published instead (unless the session proves it, see noPings)
	minMalformedPings  = 1 // the broker never drops a well-formed PINGREQ
	minStalls          = 2 // one silent end after pings is a link that died; the firmware hangs when it repeats
	minOversized       = 1 // the broker only refuses a packet above the size it advertised
	minThrottled       = 1 // the limits are well above what any device needs by design
	minAuthFailures    = 3 // one or two are a typo or a race with a token rotation
	minTLSFailures     = 1 // the handshake either works or it does not
	minIdleCutMillis   = 1000
	fixUpgradeFirmware = "upgrade the firmware (a campaign can target incompatible devices)"
	fixStalls          = "the firmware hangs (a frozen main loop or network stack until its watchdog reboots it): collect the device's logs and upgrade the firmware; if it sits on a weak link, check its signal too"
	fixFlapLost        = "its connections break without a DISCONNECT: if keepalive_mismatch is named, fix the keepalive; otherwise check the device's power, signal and network"
)

// Diagnose explains why a device drops: the current problems, each with its
// cause, evidence and a fix, in a stable order (most severe first, see the
// Problem* constants). It returns nil for a healthy device.
//
// events are the device's recent events in any order; those older than
// now-Window are ignored. Diagnose does not filter by device id, so the
// caller may add refusals that carry none (a failed TLS handshake happens
// before the device names itself, so it is matched by remote address or
// certificate). incompat is what CompiledRules.Check and the learned
// verdicts say about the device's firmware; each becomes a problem.
func Diagnose(d Device, events []Event, incompat []Incompatibility, now time.Time, p DiagnosisPolicy) []Problem {
	evs := make([]Event, 0, len(events))
	for _, e := range events {
		if p.Window > 0 && e.At.Before(now.Add(-p.Window)) {
			continue
		}
		evs = append(evs, e)
	}
	slices.SortStableFunc(evs, func(a, b Event) int { return a.At.Compare(b.At) })

	var out []Problem
	for _, inc := range incompat {
		out = append(out, Problem{
			Code:  ProblemIncompatibleFirmware,
			Cause: inc.Detail,
			Evidence: map[string]any{
				"reason": inc.Reason, "firmware": d.Firmware, "protocol": d.ProtocolVersion.String(),
			},
			Fix: "upgrade to a supported firmware with a campaign targeting compat: incompatible",
		})
	}
	for _, rule := range []func(Device, []Event, DiagnosisPolicy) *Problem{
		malformedPings, noPings, stalls, oversizedPackets, duplicateClientID, keepaliveMismatch, throttled, flapping,
		tlsFailures, authFailures, idUsedElsewhere, decommissionedRetrying,
	} {
		if pr := rule(d, evs, p); pr != nil {
			if idle, ok := pr.Evidence["idle_seconds"].(int); ok && pr.Code == ProblemKeepaliveMismatch {
				pr.Cleared = cutOutlived(d, evs, idle, now)
			}
			out = append(out, *pr)
		}
	}
	return out
}

// cutOutlivedFactor is how many idle cuts the newest session must outlive
// for a keepalive mismatch to be over: one could be luck (traffic of its
// own kept it busy), three are the new keepalive at work.
const cutOutlivedFactor = 3

// cutOutlived says why an idle cut at idle seconds no longer ends the
// device's sessions, or "" while it may: the newest session runs on a
// keepalive below the cut and has lasted cutOutlivedFactor cuts, up to now
// if it is live, or until it ended otherwise than by the cut.
func cutOutlived(d Device, evs []Event, idle int, now time.Time) string {
	var start *Event
	for i := range evs {
		if evs[i].Kind == KindConnect && (start == nil || !evs[i].At.Before(start.At)) {
			start = &evs[i]
		}
	}
	if start == nil || idle <= 0 {
		return ""
	}
	k, end := keepaliveOf(*start), time.Time{}
	if d.Online && d.SessionEpoch == start.SessionEpoch {
		if dk := cmp.Or(d.KeepaliveEffective, d.KeepaliveRequested); dk != 0 {
			k = dk
		}
		end = now
	}
	for _, e := range evs {
		if e.Kind == KindDisconnect && e.SessionEpoch == start.SessionEpoch && e.DeviceID == start.DeviceID {
			if e.Reason == ReasonConnectionLost {
				return "" // lost again: perhaps the same cut
			}
			end = e.At
		}
	}
	lasted := end.Sub(start.At)
	if k == 0 || k >= idle || end.IsZero() || lasted < cutOutlivedFactor*time.Duration(idle)*time.Second {
		return ""
	}
	return fmt.Sprintf("since %s the device connects with a keepalive of %d s, and that session has lasted %s, %d times the %d s cut",
		start.At.UTC().Format(time.RFC3339), k, lasted.Round(time.Second), int(lasted/(time.Duration(idle)*time.Second)), idle)
}

// malformedPings finds sessions the broker ended because a PINGREQ broke the
// protocol (reserved flag bits set, [MQTT-2.2.2-2]).
func malformedPings(d Device, evs []Event, _ DiagnosisPolicy) *Problem {
	var n int
	var last Event
	for _, e := range evs {
		if e.Kind == KindDisconnect && e.Reason == ReasonProtocolError && strings.HasPrefix(e.Detail, pingDetailPrefix) && onFirmware(d, e) {
			n++
			last = e
		}
	}
	if n < minMalformedPings {
		return nil
	}
	return &Problem{
		Code:  ProblemMalformedPings,
		Cause: fmt.Sprintf("the firmware sends malformed pings (%q), and the broker must close the connection on a malformed packet", last.Detail),
		Evidence: map[string]any{
			"sessions": n, "detail": last.Detail, "last_at": last.At, "firmware": d.Firmware, "protocol": d.ProtocolVersion.String(),
		},
		Fix: fixUpgradeFirmware,
	}
}

// noPings finds sessions that hit the keepalive deadline without a single
// PINGREQ, on the device's current firmware. Two such sessions name it. One
// is enough when it proves the firmware never keeps a session alive: the
// device went silent within its first keepalive period (everything it sent
// came before it was due to ping) and stayed silent to the deadline. A
// device that published instead of pinging and then lost its network has
// talked past its first period, so it needs the second session, and so does
// a firmware seen pinging in another session of the window (one silent end
// is then more likely a lost link).
func noPings(d Device, evs []Event, _ DiagnosisPolicy) *Problem {
	var n, proven int
	pinged := false
	for _, e := range evs {
		if e.Kind != KindDisconnect || !onFirmware(d, e) {
			continue
		}
		pinged = pinged || e.Pings > 0
		if e.Reason != ReasonKeepaliveTimeout || e.Pings != 0 {
			continue
		}
		n++
		if k := keepaliveOf(e); k > 0 && e.DurationMillis > 0 && talkedFor(e) < int64(k)*1000 {
			proven++
		}
	}
	if n < minNoPings && (proven == 0 || pinged) {
		return nil
	}
	return &Problem{
		Code:     ProblemNoPings,
		Cause:    "the device never sends PINGREQ: its firmware does not keep the session alive",
		Evidence: map[string]any{"sessions": n, "firmware": d.Firmware},
		Fix:      fixUpgradeFirmware,
	}
}

// stalls finds sessions that hit the keepalive deadline after the device
// had been pinging: it stopped sending anything, its connection left open.
// That is a firmware that hangs (a frozen main loop or network stack, until
// a watchdog reboots it), or a link that died without closing; once it
// repeats, the firmware is the place to look.
func stalls(d Device, evs []Event, _ DiagnosisPolicy) *Problem {
	var n int
	var talked []int64
	var last Event
	for _, e := range evs {
		if e.Kind == KindDisconnect && e.Reason == ReasonKeepaliveTimeout && e.Pings > 0 && onFirmware(d, e) {
			n++
			last = e
			if e.DurationMillis > 0 {
				talked = append(talked, talkedFor(e))
			}
		}
	}
	if n < minStalls {
		return nil
	}
	cause := fmt.Sprintf("the device stops talking with its connection open: %d sessions hit the keepalive deadline after it had been pinging (the last after %d pings)", n, last.Pings)
	evidence := map[string]any{"sessions": n, "keepalive": keepaliveOf(last), "last_at": last.At, "firmware": d.Firmware}
	if len(talked) > 0 {
		// The median time into a session at which the device froze.
		slices.Sort(talked)
		after := int(math.Round(float64(talked[len(talked)/2]) / 1000))
		cause += fmt.Sprintf("; it went silent about %d s into a session", after)
		evidence["talked_seconds"] = after
	}
	return &Problem{
		Code:     ProblemStalls,
		Cause:    cause,
		Evidence: evidence,
		Fix:      fixStalls,
	}
}

// oversizedPackets finds sessions the broker ended because the device sent
// a packet larger than the maximum packet size (advertised to MQTT 5
// devices in the CONNACK).
func oversizedPackets(d Device, evs []Event, _ DiagnosisPolicy) *Problem {
	var n int
	var last Event
	for _, e := range evs {
		if e.Kind == KindDisconnect && e.Reason == ReasonPacketTooLarge {
			n++
			last = e
		}
	}
	if n < minOversized {
		return nil
	}
	cause := fmt.Sprintf("the device sends packets larger than the broker accepts: %d sessions ended for it", n)
	if last.Detail != "" {
		cause += " (" + last.Detail + ")"
	}
	return &Problem{
		Code:     ProblemOversizedPackets,
		Cause:    cause,
		Evidence: map[string]any{"sessions": n, "detail": last.Detail, "last_at": last.At, "firmware": d.Firmware},
		Fix:      "make the firmware split or shrink its messages, or raise FLEETD_MQTT_MAX_PACKET if such messages are expected",
	}
}

// throttled finds the broker's limits applied to the device itself: connects
// refused because the device reconnects too often (counted after it
// authenticated), and sessions ended because it sent messages too fast.
func throttled(_ Device, evs []Event, _ DiagnosisPolicy) *Problem {
	var refused, ended int
	var last Event
	for _, e := range evs {
		switch {
		case e.Kind == KindRefused && e.Reason == ReasonThrottled && e.Detail == DetailReconnectsTooOften:
			refused++
		case e.Kind == KindDisconnect && e.Reason == ReasonThrottled:
			ended++
		default:
			continue
		}
		last = e
	}
	if refused+ended < minThrottled {
		return nil
	}
	var parts, fixes []string
	if refused > 0 {
		parts = append(parts, fmt.Sprintf("refused %d connects because it reconnects too often", refused))
		fixes = append(fixes, "make the device reconnect with exponential backoff and jitter")
	}
	if ended > 0 {
		parts = append(parts, fmt.Sprintf("ended %d sessions because it sent messages faster than a session may", ended))
		fixes = append(fixes, "make it publish less often (or raise FLEETD_MQTT_PUBLISH_RATE)")
	}
	return &Problem{
		Code:     ProblemThrottled,
		Cause:    "the broker throttles the device: it " + strings.Join(parts, " and "),
		Evidence: map[string]any{"refused_connects": refused, "ended_sessions": ended, "last_at": last.At},
		Fix:      strings.Join(fixes, "; "),
	}
}

// decommissionedRetrying finds a decommissioned device that keeps trying to
// connect: the zombie nobody switched off, seen from the server side.
func decommissionedRetrying(d Device, evs []Event, p DiagnosisPolicy) *Problem {
	if d.State != StateDecommissioned {
		return nil
	}
	var n int
	var first, last Event
	addrs := map[string]bool{}
	for _, e := range evs {
		if e.Kind != KindRefused || e.Reason != ReasonDecommissioned {
			continue
		}
		if n == 0 {
			first = e
		}
		n++
		last = e
		if ip := hostOf(e.RemoteAddr); ip != "" {
			addrs[ip] = true
		}
	}
	if n == 0 {
		return nil
	}
	span := last.At.Sub(first.At)
	every := "once"
	if n > 1 {
		every = "every " + (span / time.Duration(n-1)).Round(time.Second).String()
	}
	when := "the last hour"
	if p.Window > 0 {
		when = "the last " + p.Window.String()
	}
	return &Problem{
		Code: ProblemDecommissionedRetrying,
		Cause: fmt.Sprintf("the device is decommissioned but still tries to connect: %d attempts in %s (%s) from %s, the last at %s",
			n, when, every, strings.Join(sortedKeys(addrs), ", "), last.At.UTC().Format(time.RFC3339)),
		Evidence: map[string]any{"attempts": n, "addresses": sortedKeys(addrs), "first_at": first.At, "last_at": last.At,
			"decommissioned_at": d.DecommissionedAt},
		Fix: "find the device at these addresses and switch it off or wipe it; register it again if it should be back in the fleet",
	}
}

// duplicateClientID finds two devices taking one client id from each other.
// A takeover's old session is the disconnect event's; its new session is the
// connect with the next higher epoch. Two kinds of takeover show a clone:
//   - between different IP addresses (a single device reconnecting keeps
//     its address, or changes it once, not back and forth);
//   - ping-pong, whatever the addresses (two gateways behind one router
//     share one): the taken-over session had itself just taken the id over,
//     and it was live, heard from within its keepalive. A device that
//     reconnects over its own stale session takes over a session that had
//     gone silent, and does not lose the new one the same way at once.
//
// TakeoverMin takeovers of either kind name it (by default the second: a
// chain of two takeovers in a row, the second of a live session, is one
// ping-pong).
func duplicateClientID(_ Device, evs []Event, p DiagnosisPolicy) *Problem {
	var connects []Event
	var epochs []int64 // every session seen, by its connect or its end
	takenOver := map[int64]bool{}
	for _, e := range evs {
		switch e.Kind {
		case KindConnect:
			connects = append(connects, e)
		case KindDisconnect:
			takenOver[e.SessionEpoch] = takenOver[e.SessionEpoch] || e.Reason == ReasonSessionTakeover
		default:
			continue
		}
		epochs = append(epochs, e.SessionEpoch)
	}
	// next returns the connect of the session just after an epoch.
	next := func(epoch int64) *Event {
		var best *Event
		for i, c := range connects {
			if c.SessionEpoch > epoch && (best == nil || c.SessionEpoch < best.SessionEpoch) {
				best = &connects[i]
			}
		}
		return best
	}
	// prevTakenOver reports whether the session just before an epoch was
	// taken over (by the one at epoch, then).
	prevTakenOver := func(epoch int64) bool {
		var prev int64
		found := false
		for _, x := range epochs {
			if x < epoch && (!found || x > prev) {
				prev, found = x, true
			}
		}
		return found && takenOver[prev]
	}
	var takeovers, crossAddr, pingPong int
	addrs := map[string]bool{}
	for _, e := range evs {
		if e.Kind != KindDisconnect || e.Reason != ReasonSessionTakeover {
			continue
		}
		takeovers++
		if next := next(e.SessionEpoch); next != nil {
			oldIP, newIP := hostOf(e.RemoteAddr), hostOf(next.RemoteAddr)
			if oldIP != "" && newIP != "" && oldIP != newIP {
				crossAddr++
				addrs[oldIP], addrs[newIP] = true, true
				continue
			}
		}
		k := keepaliveOf(e)
		live := e.IdleMillis >= 0 && (k == 0 && e.IdleMillis < 60_000 || e.IdleMillis < k*1000)
		if live && prevTakenOver(e.SessionEpoch) {
			pingPong++
			if ip := hostOf(e.RemoteAddr); ip != "" {
				addrs[ip] = true
			}
		}
	}
	// A ping-pong is a chain's second takeover or later: the chain holds one
	// takeover more than its ping-pongs.
	crossOK := crossAddr > 0 && crossAddr >= p.TakeoverMin
	pingPongOK := pingPong > 0 && pingPong+1 >= p.TakeoverMin
	if !crossOK && !pingPongOK {
		return nil
	}
	cause := fmt.Sprintf("two devices share this client id: they took the session from each other %d times from different addresses", crossAddr)
	if !crossOK {
		cause = fmt.Sprintf("two devices share this client id: live sessions took it from each other %d times in a row (from %s: behind one NAT)",
			pingPong+1, strings.Join(sortedKeys(addrs), ", "))
	}
	return &Problem{
		Code:     ProblemDuplicateClientID,
		Cause:    cause,
		Evidence: map[string]any{"takeovers": takeovers, "cross_address": crossAddr, "ping_pong": pingPong, "addresses": sortedKeys(addrs)},
		Fix:      "give each device its own id and token (register a second device)",
	}
}

// keepaliveMismatch finds sessions lost at about the same idle time, shorter
// than the keepalive, while the device was silent: a NAT or load balancer
// forgets idle connections before the device pings. A session idle for at
// least its keepalive is left out, because the broker's own deadline (1.5 ×
// keepalive, [MQTT-3.1.2-24]) or a device that stopped pinging explains it;
// so is a drop within a second of the device's last packet (it was sending,
// not idle). A keepalive of 0 (off) never pings, so it cannot outlast any
// idle cut. The cut must explain at least IdleCutShare of the device's lost
// connections, and no session may have survived a longer silence: a device
// that drops at random also ends a few sessions at similar idle times, but
// not most of them, and some of its sessions outlive its ping interval.
func keepaliveMismatch(_ Device, evs []Event, p DiagnosisPolicy) *Problem {
	var cands []Event
	lost := 0
	for _, e := range evs {
		if e.Kind != KindDisconnect || e.Reason != ReasonConnectionLost {
			continue
		}
		lost++
		if e.IdleMillis < minIdleCutMillis || strings.HasPrefix(e.Detail, DetailWriteTimeoutPrefix) {
			continue // sending when it dropped, or it stopped reading: not an idle cut
		}
		if k := keepaliveOf(e); k == 0 || e.IdleMillis < k*1000 {
			cands = append(cands, e)
		}
	}
	if len(cands) == 0 || len(cands) < p.IdleCutMin {
		return nil
	}
	slices.SortStableFunc(cands, func(a, b Event) int { return cmp.Compare(a.IdleMillis, b.IdleMillis) })
	near := func(idle int, center float64) bool {
		return math.Abs(float64(idle)-center) <= p.IdleCutTolerance*center
	}
	// Take the densest cluster, so that a few random losses do not pull the
	// median away from the cut; then measure the cut as that cluster's median.
	var best []Event
	for _, c := range cands {
		var cluster []Event
		for _, e := range cands {
			if near(e.IdleMillis, float64(c.IdleMillis)) {
				cluster = append(cluster, e)
			}
		}
		if len(cluster) > len(best) {
			best = cluster
		}
	}
	median := medianIdle(best)
	var cluster []Event
	for _, e := range cands {
		if near(e.IdleMillis, median) {
			cluster = append(cluster, e)
		}
	}
	if len(cluster) == 0 || len(cluster) < p.IdleCutMin || float64(len(cluster)) < p.IdleCutShare*float64(lost) {
		return nil
	}
	// A path that cuts idle connections at C never lets one stay silent
	// longer: a session that survived a longer silence (a device that
	// dropped at random after outliving its first ping interval) disproves it.
	longest := slices.MaxFunc(cluster, func(a, b Event) int { return cmp.Compare(a.IdleMillis, b.IdleMillis) }).IdleMillis
	for _, e := range evs {
		if e.Kind == KindDisconnect && e.MaxSilenceMillis > longest {
			return nil
		}
	}
	// Report the keepalive of the newest session: the setting to change.
	latest := slices.MaxFunc(cluster, func(a, b Event) int { return a.At.Compare(b.At) })
	k := keepaliveOf(latest)
	idle := int(math.Round(median / 1000))
	cause := fmt.Sprintf("something on the path cuts idle connections at about %d s, before the device's keepalive of %d s", idle, k)
	if k == 0 {
		cause = fmt.Sprintf("something on the path cuts idle connections at about %d s, and the device has keepalive off", idle)
	}
	return &Problem{
		Code:     ProblemKeepaliveMismatch,
		Cause:    cause,
		Evidence: map[string]any{"idle_seconds": idle, "keepalive": k, "sessions": len(cluster), "lost_connections": lost},
		Fix:      fmt.Sprintf("use a keepalive below %d s (e.g. %d s) for this device or model", idle, max(idle/2, 1)),
		Remedy:   &Remedy{Config: map[string]any{ConfigKeepalive: max(idle/2, 1)}},
	}
}

// flapping finds a device that starts session after session; the cause is
// whatever ends most of them. It is a summary: the rules that name a specific
// cause run on the same events and are reported as well, and the fix points
// at them.
func flapping(_ Device, evs []Event, p DiagnosisPolicy) *Problem {
	var starts []time.Time
	reasons := map[string]int{}
	for _, e := range evs {
		switch e.Kind {
		case KindConnect:
			starts = append(starts, e.At)
		case KindDisconnect:
			reasons[string(e.Reason)]++
		}
	}
	if p.FlapWindow <= 0 {
		return nil
	}
	// The most sessions that started within any FlapWindow (a half-open span).
	most := 0
	for i, j := 0, 0; j < len(starts); j++ {
		for starts[j].Sub(starts[i]) >= p.FlapWindow {
			i++
		}
		most = max(most, j-i+1)
	}
	if most <= p.FlapSessions {
		return nil
	}
	dominant := dominantReason(reasons)
	cause := fmt.Sprintf("the device started %d sessions within %s", most, p.FlapWindow)
	if dominant != "" {
		cause += fmt.Sprintf("; most sessions ended with %s", dominant)
	}
	return &Problem{
		Code:  ProblemFlapping,
		Cause: cause,
		Evidence: map[string]any{
			"sessions": most, "window": p.FlapWindow.String(), "dominant_reason": dominant, "reasons": reasons,
		},
		Fix: flapFix(Reason(dominant)),
	}
}

func flapFix(r Reason) string {
	switch r {
	case ReasonSessionTakeover:
		return "another device uses this client id (see duplicate_client_id): give each device its own id and token"
	case ReasonKeepaliveTimeout:
		return "the device goes silent past its keepalive: see no_pings (it never pings) or stalls (it hangs)"
	case ReasonProtocolError:
		return "upgrade the firmware: the broker closes its sessions for protocol errors (see malformed_pings)"
	case ReasonThrottled:
		return "the broker throttles the device (see throttled): make it send less and reconnect with backoff and jitter"
	case ReasonPacketTooLarge:
		return "the device sends packets above the broker's maximum (see oversized_packets)"
	case ReasonConnectionLost:
		return fixFlapLost
	}
	return "check the device's power and network"
}

// tlsFailures finds failed TLS handshakes and picks the fix from the latest
// error, which says which side rejected which certificate.
func tlsFailures(d Device, evs []Event, _ DiagnosisPolicy) *Problem {
	var n int
	var last Event
	addrs := map[string]bool{}
	own := ownAddresses(d, evs)
	for _, e := range evs {
		if e.Kind == KindRefused && e.Reason == ReasonTLSHandshakeFailed && !foreign(e, own) {
			n++
			last = e
			if ip := hostOf(e.RemoteAddr); ip != "" {
				addrs[ip] = true
			}
		}
	}
	if n < minTLSFailures {
		return nil
	}
	return &Problem{
		Code:  ProblemTLSHandshakeFailures,
		Cause: fmt.Sprintf("TLS handshakes fail: %q", last.Detail),
		Evidence: map[string]any{
			"failures": n, "detail": last.Detail, "last_at": last.At, "addresses": sortedKeys(addrs),
		},
		Fix: tlsFix(last.Detail),
	}
}

// tlsFix reads a Go TLS error. "remote error" means the device sent the
// alert, so it rejected the server's certificate rather than the reverse.
func tlsFix(detail string) string {
	d := strings.ToLower(detail)
	remote := strings.Contains(d, "remote error")
	switch {
	case strings.Contains(d, "expired"):
		if remote {
			return "renew the server's certificate, or set the device's clock if it is wrong"
		}
		return "renew the device's certificate (or set the device's clock if it is wrong)"
	case strings.Contains(d, "unknown authority"), strings.Contains(d, "unknown_ca"), strings.Contains(d, "unknown certificate authority"):
		if remote {
			return "install the CA that signed the server's certificate on the device"
		}
		return "issue the device's certificate from the configured device CA"
	case strings.Contains(d, "protocol version"), strings.Contains(d, "unsupported versions"):
		return "enable TLS 1.2 or later on the device, or upgrade its firmware"
	}
	return "check the device's TLS settings: its certificate, the CA it trusts and its TLS version"
}

// authFailures finds repeated refused logins and picks the fix from the most
// common reason the broker gave.
func authFailures(d Device, evs []Event, _ DiagnosisPolicy) *Problem {
	var n int
	details := map[string]int{}
	latest := map[string]time.Time{}
	var last Event
	own := ownAddresses(d, evs)
	for _, e := range evs {
		if isAuthRefusal(e) && !foreign(e, own) {
			n++
			details[e.Detail]++
			latest[e.Detail] = e.At
			last = e
		}
	}
	if n < minAuthFailures {
		return nil
	}
	// The most common detail; on a tie, the most recent one.
	top := topKey(details, func(a, b string) int { return latest[a].Compare(latest[b]) })
	fix := "rotate the device's token and provision it"
	switch top {
	case "unknown device":
		fix = "register the device"
	case "registry unavailable":
		fix = "check fleetd's database: the broker could not look the device up"
	}
	return &Problem{
		Code:     ProblemAuthFailures,
		Cause:    fmt.Sprintf("the broker refused the device's credentials %d times: %q", n, top),
		Evidence: map[string]any{"failures": n, "detail": top, "details": details, "last_at": last.At},
		Fix:      fix,
	}
}

// ownAddresses are the IP addresses the device has proved itself from: those
// of its sessions in the window, and the one it last connected from.
func ownAddresses(d Device, evs []Event) map[string]bool {
	own := map[string]bool{}
	if ip := hostOf(d.RemoteAddr); ip != "" {
		own[ip] = true
	}
	for _, e := range evs {
		if e.Kind == KindConnect {
			if ip := hostOf(e.RemoteAddr); ip != "" {
				own[ip] = true
			}
		}
	}
	return own
}

// foreign reports whether a refused attempt under the device's id was made by
// someone else. Refused attempts are unauthenticated: anyone can claim an id.
// Once the device has proved itself from some address, an attempt from an
// address it never connected from is someone else's, and so is a certificate
// not signed by the device CA wherever it comes from (the device has
// credentials that work). While the device has never connected, nothing
// tells it from an impostor, and a failure may well be its own (a device
// provisioned with the wrong certificate or token).
func foreign(e Event, own map[string]bool) bool {
	if len(own) == 0 {
		return false
	}
	if e.Reason == ReasonTLSHandshakeFailed && strings.HasPrefix(e.Detail, "unknown_ca") {
		return true
	}
	return !own[hostOf(e.RemoteAddr)]
}

// idUsedElsewhere finds refused attempts under the device's id that someone
// else made (foreign), so that an attacker holding a victim's id, or a clone
// with a stale token, is not diagnosed as the device's own wrong credentials.
func idUsedElsewhere(d Device, evs []Event, _ DiagnosisPolicy) *Problem {
	own := ownAddresses(d, evs)
	var n, tlsN int
	addrs := map[string]bool{}
	details := map[string]int{}
	var last Event
	for _, e := range evs {
		if !isAuthRefusal(e) && (e.Kind != KindRefused || e.Reason != ReasonTLSHandshakeFailed) || !foreign(e, own) {
			continue
		}
		n++
		if e.Reason == ReasonTLSHandshakeFailed {
			tlsN++
		}
		addrs[hostOf(e.RemoteAddr)] = true
		details[e.Detail]++
		last = e
	}
	if n-tlsN < minAuthFailures && tlsN < minTLSFailures {
		return nil
	}
	return &Problem{
		Code: ProblemIDUsedElsewhere,
		Cause: fmt.Sprintf("someone else is using this device's id: %d refused attempts from %s, where the device does not connect from",
			n, strings.Join(sortedKeys(addrs), ", ")),
		Evidence: map[string]any{"attempts": n, "tls_handshakes": tlsN, "addresses": sortedKeys(addrs), "details": details,
			"device_addresses": sortedKeys(own), "last_at": last.At},
		Fix: "the device's own credentials work: find what connects from these addresses (a cloned device, a leaked id, an attacker) and stop it; rotate the device's token if it may have leaked",
	}
}

// isAuthRefusal reports a refusal for wrong credentials, including one the
// per-source limit on failed authentications turned into a throttle: both
// are unauthenticated, so anyone could have caused them under the id.
func isAuthRefusal(e Event) bool {
	return e.Kind == KindRefused && (e.Reason == ReasonAuthFailed ||
		e.Reason == ReasonThrottled && strings.HasPrefix(e.Detail, DetailFailedAuthPrefix))
}

// onFirmware reports whether an event happened on the device's current
// firmware (or says nothing about it), so that a problem of the firmware a
// campaign replaced disappears with it.
func onFirmware(d Device, e Event) bool {
	return e.Firmware == "" || d.Firmware == "" || e.Firmware == d.Firmware
}

// talkedFor is how long into a session the device last sent something: its
// duration minus the silence at its end.
func talkedFor(e Event) int64 { return max(e.DurationMillis-int64(e.IdleMillis), 0) }

// keepaliveOf is the keepalive in seconds that governed a session: the
// broker's (MQTT 5 Server Keep Alive) when it set one, else the device's.
func keepaliveOf(e Event) int {
	if e.KeepaliveEffective != 0 {
		return e.KeepaliveEffective
	}
	return e.KeepaliveRequested
}

// hostOf returns the IP of an address with or without a port.
func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}

func medianIdle(evs []Event) float64 {
	v := make([]int, len(evs))
	for i, e := range evs {
		v[i] = e.IdleMillis
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return float64(v[len(v)/2])
	}
	return float64(v[len(v)/2-1]+v[len(v)/2]) / 2
}

// dominantReason is the most common reason; ties go to the one listed first
// in Reasons, so the answer does not depend on map order.
func dominantReason(counts map[string]int) string {
	rank := func(r string) int {
		if i := slices.Index(Reasons, Reason(r)); i >= 0 {
			return i
		}
		return len(Reasons)
	}
	return topKey(counts, func(a, b string) int { return cmp.Compare(rank(b), rank(a)) })
}

// topKey returns the key with the highest count, breaking ties with prefer
// (greater wins) and then by name, so that map order never shows; "" when
// counts is empty.
func topKey(counts map[string]int, prefer func(a, b string) int) string {
	var top string
	found := false
	for _, k := range sortedKeys(counts) {
		if !found || counts[k] > counts[top] || counts[k] == counts[top] && prefer(k, top) > 0 {
			top, found = k, true
		}
	}
	return top
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// ProblemKeepaliveAbovePolicy: an MQTT 3 device asks for a keepalive above
// the policy's cap. MQTT 5 devices are told the cap in the CONNACK (Server
// Keep Alive); MQTT 3 has no way to tell them, so the operator must.
const ProblemKeepaliveAbovePolicy = "keepalive_above_policy"

// keepalivePolicyProblem reports an MQTT 3 device whose requested keepalive
// (0 means none at all) exceeds the cap of its model; capSeconds 0 is no cap.
func keepalivePolicyProblem(d Device, capSeconds int) *Problem {
	if capSeconds <= 0 || d.ProtocolVersion == 0 || d.ProtocolVersion >= 5 {
		return nil
	}
	if d.KeepaliveRequested != 0 && d.KeepaliveRequested <= capSeconds {
		return nil
	}
	asked := fmt.Sprintf("%d s", d.KeepaliveRequested)
	if d.KeepaliveRequested == 0 {
		asked = "no keepalive"
	}
	return &Problem{
		Code: ProblemKeepaliveAbovePolicy,
		Cause: fmt.Sprintf("the device asks for %s, above the %d s the keepalive policy allows for %s; MQTT %s cannot be told",
			asked, capSeconds, modelPhrase(d.Model), d.ProtocolVersion),
		Evidence: map[string]any{"keepalive_requested": d.KeepaliveRequested, "policy_seconds": capSeconds, "protocol": d.ProtocolVersion.String()},
		Fix:      fmt.Sprintf("configure the device's keepalive to %d s or less (or move it to MQTT 5, where fleetd sets it)", capSeconds),
		Remedy:   &Remedy{Config: map[string]any{ConfigKeepalive: capSeconds}},
	}
}
