package fleet

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var diagNow = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

// ev dates an event ago before diagNow and gives it to device gw-1.
func ev(ago time.Duration, e Event) Event {
	e.DeviceID = "gw-1"
	e.At = diagNow.Add(-ago)
	return e
}

// session is a connect from addr and its disconnect, ended by e, one minute
// later; start is how long before diagNow the session started.
func session(start time.Duration, epoch int64, addr string, end Event) []Event {
	end.Kind, end.SessionEpoch, end.RemoteAddr = KindDisconnect, epoch, addr
	if end.KeepaliveRequested == 0 {
		end.KeepaliveRequested = 60
	}
	return []Event{
		ev(start, Event{Kind: KindConnect, SessionEpoch: epoch, RemoteAddr: addr, KeepaliveRequested: end.KeepaliveRequested, KeepaliveEffective: end.KeepaliveEffective}),
		ev(start-time.Minute, end),
	}
}

// sessions starts n sessions every interval, the first start before diagNow,
// each ended by end; epochs count up from 1.
func sessions(n int, start, every time.Duration, end Event) []Event {
	var out []Event
	for i := range n {
		out = append(out, session(start-time.Duration(i)*every, int64(i+1), "203.0.113.7:50000", end)...)
	}
	return out
}

func cat(parts ...[]Event) []Event {
	var out []Event
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

var (
	clean    = Event{Reason: ReasonClientDisconnect, Pings: 10, IdleMillis: 800}
	lost     = Event{Reason: ReasonConnectionLost, Pings: 3, IdleMillis: 70000} // silent past its keepalive: no path cut
	noPingKA = Event{Reason: ReasonKeepaliveTimeout, IdleMillis: 90000}
	badPing  = Event{Reason: ReasonProtocolError, Detail: "PINGREQ with reserved flags 0x2", Pings: 1, IdleMillis: 200}
	cutAt    = func(ms int) Event {
		return Event{Reason: ReasonConnectionLost, Detail: "closed by the client without DISCONNECT", Pings: 2, IdleMillis: ms}
	}
	refusal = func(ago time.Duration, r Reason, detail string) Event {
		return ev(ago, Event{Kind: KindRefused, Reason: r, Detail: detail, RemoteAddr: "198.51.100.4:41000"})
	}
	// takeover: a connect from newAddr takes over the session of oldEpoch,
	// whose device was last heard from 45 s before (past its keepalive of 30
	// s: a stale session); liveTakeover: 2 s before (a live one).
	takeover = func(ago time.Duration, oldEpoch int64, oldAddr, newAddr string) []Event {
		return takeoverIdle(ago, oldEpoch, oldAddr, newAddr, 45000)
	}
	liveTakeover = func(ago time.Duration, oldEpoch int64, oldAddr, newAddr string) []Event {
		return takeoverIdle(ago, oldEpoch, oldAddr, newAddr, 2000)
	}
	takeoverIdle = func(ago time.Duration, oldEpoch int64, oldAddr, newAddr string, idle int) []Event {
		return []Event{
			ev(ago, Event{Kind: KindConnect, SessionEpoch: oldEpoch + 1, RemoteAddr: newAddr, KeepaliveRequested: 30}),
			ev(ago, Event{Kind: KindDisconnect, Reason: ReasonSessionTakeover, SessionEpoch: oldEpoch, RemoteAddr: oldAddr, Pings: 5,
				KeepaliveRequested: 30, IdleMillis: idle}),
		}
	}
)

func TestDiagnose(t *testing.T) {
	p := DefaultDiagnosisPolicy()
	dev := Device{ID: "gw-1", Model: "gw-100", Firmware: "1.0.3", ProtocolVersion: 4, KeepaliveRequested: 60}
	tests := []struct {
		name     string
		events   []Event
		incompat []Incompatibility
		want     []Problem
	}{
		{"no events", nil, nil, nil},
		{"healthy device", cat(
			sessions(4, 50*time.Minute, 10*time.Minute, clean),
			session(5*time.Minute, 5, "203.0.113.7:50000", Event{Reason: ReasonKeepaliveTimeout, Pings: 7, IdleMillis: 90000}),
			sessions(2, 3*time.Minute, time.Minute, lost),
		), nil, nil},

		// incompatible_firmware
		{"incompatibilities become problems in order", nil, []Incompatibility{
			{IncompatBelowMinimum, "firmware 1.0.3 is below the minimum 1.1.0 for model gw-100"},
			{IncompatRejectsPings, "firmware 1.0.3 of model gw-100 rejects pings: 40 ping-related disconnects"},
		}, []Problem{{
			Code: ProblemIncompatibleFirmware, Cause: "firmware 1.0.3 is below the minimum 1.1.0 for model gw-100",
			Evidence: map[string]any{"reason": IncompatBelowMinimum, "firmware": "1.0.3", "protocol": "3.1.1"},
			Fix:      "upgrade to a supported firmware with a campaign targeting compat: incompatible",
		}, {
			Code: ProblemIncompatibleFirmware, Cause: "firmware 1.0.3 of model gw-100 rejects pings: 40 ping-related disconnects",
			Evidence: map[string]any{"reason": IncompatRejectsPings, "firmware": "1.0.3", "protocol": "3.1.1"},
			Fix:      "upgrade to a supported firmware with a campaign targeting compat: incompatible",
		}}},

		// malformed_pings
		{"one malformed ping", cat(sessions(2, 30*time.Minute, 10*time.Minute, clean), session(5*time.Minute, 3, "203.0.113.7:50000", badPing)), nil, []Problem{{
			Code:  ProblemMalformedPings,
			Cause: `the firmware sends malformed pings ("PINGREQ with reserved flags 0x2"), and the broker must close the connection on a malformed packet`,
			Evidence: map[string]any{"sessions": 1, "detail": "PINGREQ with reserved flags 0x2", "last_at": diagNow.Add(-4 * time.Minute),
				"firmware": "1.0.3", "protocol": "3.1.1"},
			Fix: "upgrade the firmware (a campaign can target incompatible devices)",
		}}},
		{"other protocol errors are not pings", session(5*time.Minute, 1, "203.0.113.7:50000", Event{Reason: ReasonProtocolError, Detail: "malformed packet"}), nil, nil},
		{"malformed ping outside the window", session(62*time.Minute, 1, "203.0.113.7:50000", badPing), nil, nil},

		// no_pings
		{"one keepalive timeout without pings", session(20*time.Minute, 1, "203.0.113.7:50000", noPingKA), nil, nil},
		{"two keepalive timeouts without pings", sessions(2, 30*time.Minute, 10*time.Minute, noPingKA), nil, []Problem{{
			Code: ProblemNoPings, Cause: "the device never sends PINGREQ: its firmware does not keep the session alive",
			Evidence: map[string]any{"sessions": 2, "firmware": "1.0.3"},
			Fix:      "upgrade the firmware (a campaign can target incompatible devices)",
		}}},
		{"timeouts with pings do not count", cat(
			session(30*time.Minute, 1, "203.0.113.7:50000", noPingKA),
			session(20*time.Minute, 2, "203.0.113.7:50000", Event{Reason: ReasonKeepaliveTimeout, Pings: 3, IdleMillis: 90000}),
		), nil, nil},
		{"second timeout outside the window", cat(
			session(70*time.Minute, 1, "203.0.113.7:50000", noPingKA),
			session(20*time.Minute, 2, "203.0.113.7:50000", noPingKA),
		), nil, nil},

		// duplicate_client_id
		{"one takeover", takeover(10*time.Minute, 1, "203.0.113.7:50000", "198.51.100.9:61000"), nil, nil},
		{"two takeovers between two addresses", cat(
			takeover(20*time.Minute, 1, "203.0.113.7:50000", "198.51.100.9:61000"),
			takeover(10*time.Minute, 2, "198.51.100.9:61000", "203.0.113.7:50002"),
		), nil, []Problem{{
			Code:     ProblemDuplicateClientID,
			Cause:    "two devices share this client id: they took the session from each other 2 times from different addresses",
			Evidence: map[string]any{"takeovers": 2, "cross_address": 2, "ping_pong": 0, "addresses": []string{"198.51.100.9", "203.0.113.7"}},
			Fix:      "give each device its own id and token (register a second device)",
		}}},
		{"same IP on another port, stale sessions: one device reconnecting", cat(
			takeover(20*time.Minute, 1, "203.0.113.7:50000", "203.0.113.7:50001"),
			takeover(10*time.Minute, 2, "203.0.113.7:50001", "203.0.113.7:50002"),
			takeover(5*time.Minute, 3, "203.0.113.7:50002", "203.0.113.7:50003"),
		), nil, nil},
		{"clones behind one NAT: live sessions take the id back and forth", cat(
			liveTakeover(20*time.Second, 1, "203.0.113.7:50000", "203.0.113.7:50001"),
			liveTakeover(18*time.Second, 2, "203.0.113.7:50001", "203.0.113.7:50002"),
			liveTakeover(16*time.Second, 3, "203.0.113.7:50002", "203.0.113.7:50003"),
		), nil, []Problem{{
			Code:     ProblemDuplicateClientID,
			Cause:    "two devices share this client id: live sessions took it from each other 3 times in a row (from 203.0.113.7: behind one NAT)",
			Evidence: map[string]any{"takeovers": 3, "cross_address": 0, "ping_pong": 2, "addresses": []string{"203.0.113.7"}},
			Fix:      "give each device its own id and token (register a second device)",
		}}},
		{"the second takeover in a row, of a live session, names it", cat(
			takeover(20*time.Second, 1, "203.0.113.7:50000", "203.0.113.7:50001"),
			liveTakeover(18*time.Second, 2, "203.0.113.7:50001", "203.0.113.7:50002"),
		), nil, []Problem{{
			Code:     ProblemDuplicateClientID,
			Cause:    "two devices share this client id: live sessions took it from each other 2 times in a row (from 203.0.113.7: behind one NAT)",
			Evidence: map[string]any{"takeovers": 2, "cross_address": 0, "ping_pong": 1, "addresses": []string{"203.0.113.7"}},
			Fix:      "give each device its own id and token (register a second device)",
		}}},
		{"one live takeover is a reconnect", liveTakeover(18*time.Second, 2, "203.0.113.7:50001", "203.0.113.7:50002"), nil, nil},
		{"live takeovers that did not follow a takeover are reconnects", cat(
			session(50*time.Minute, 1, "203.0.113.7:50000", clean),
			liveTakeover(40*time.Minute, 2, "203.0.113.7:50000", "203.0.113.7:50001"),
			session(30*time.Minute, 4, "203.0.113.7:50000", clean),
			liveTakeover(20*time.Minute, 5, "203.0.113.7:50000", "203.0.113.7:50001"),
		), nil, nil},
		{"IPv6 addresses, epochs with gaps, newest first", []Event{
			ev(5*time.Minute, Event{Kind: KindConnect, SessionEpoch: 9, RemoteAddr: "[2001:db8::2]:1883"}),
			ev(5*time.Minute, Event{Kind: KindDisconnect, Reason: ReasonSessionTakeover, SessionEpoch: 7, RemoteAddr: "[2001:db8::1]:1883"}),
			ev(15*time.Minute, Event{Kind: KindConnect, SessionEpoch: 7, RemoteAddr: "[2001:db8::1]:1883"}),
			ev(15*time.Minute, Event{Kind: KindDisconnect, Reason: ReasonSessionTakeover, SessionEpoch: 4, RemoteAddr: "[2001:db8::2]:1883"}),
			ev(25*time.Minute, Event{Kind: KindConnect, SessionEpoch: 4, RemoteAddr: "[2001:db8::2]:1883"}),
		}, nil, []Problem{{
			Code:     ProblemDuplicateClientID,
			Cause:    "two devices share this client id: they took the session from each other 2 times from different addresses",
			Evidence: map[string]any{"takeovers": 2, "cross_address": 2, "ping_pong": 0, "addresses": []string{"2001:db8::1", "2001:db8::2"}},
			Fix:      "give each device its own id and token (register a second device)",
		}}},
		{"takeover whose new session is unknown", cat(
			takeover(20*time.Minute, 1, "203.0.113.7:50000", "198.51.100.9:61000"),
			[]Event{ev(10*time.Minute, Event{Kind: KindDisconnect, Reason: ReasonSessionTakeover, SessionEpoch: 2, RemoteAddr: "198.51.100.9:61000",
				KeepaliveRequested: 30, IdleMillis: 45000})},
		), nil, nil},
		{"first takeover outside the window", cat(
			takeover(65*time.Minute, 1, "203.0.113.7:50000", "198.51.100.9:61000"),
			takeover(10*time.Minute, 2, "198.51.100.9:61000", "203.0.113.7:50002"),
		), nil, nil},

		// keepalive_mismatch
		{"two idle cuts", cat(
			session(30*time.Minute, 1, "203.0.113.7:50000", cutAt(30000)),
			session(20*time.Minute, 2, "203.0.113.7:50000", cutAt(29500)),
		), nil, nil},
		{"three idle cuts at 30 s", cat(
			session(30*time.Minute, 1, "203.0.113.7:50000", cutAt(30000)),
			session(20*time.Minute, 2, "203.0.113.7:50000", cutAt(29500)),
			session(10*time.Minute, 3, "203.0.113.7:50000", cutAt(31000)),
		), nil, []Problem{{
			Code:     ProblemKeepaliveMismatch,
			Cause:    "something on the path cuts idle connections at about 30 s, before the device's keepalive of 60 s",
			Evidence: map[string]any{"idle_seconds": 30, "keepalive": 60, "sessions": 3, "lost_connections": 3},
			Fix:      "use a keepalive below 30 s (e.g. 15 s) for this device or model",
			Remedy:   &Remedy{Config: map[string]any{ConfigKeepalive: 15}},
		}}},
		{"cuts among random losses, effective keepalive", cat(
			session(50*time.Minute, 1, "203.0.113.7:50000", cutAt(5000)),
			session(40*time.Minute, 2, "203.0.113.7:50000", Event{Reason: ReasonConnectionLost, IdleMillis: 240000, KeepaliveRequested: 60, KeepaliveEffective: 300}),
			session(30*time.Minute, 3, "203.0.113.7:50000", Event{Reason: ReasonConnectionLost, IdleMillis: 240000, KeepaliveRequested: 60, KeepaliveEffective: 300}),
			session(20*time.Minute, 4, "203.0.113.7:50000", cutAt(100000)),
			session(10*time.Minute, 5, "203.0.113.7:50000", Event{Reason: ReasonConnectionLost, IdleMillis: 250000, KeepaliveRequested: 60, KeepaliveEffective: 300}),
		), nil, []Problem{{
			Code:     ProblemKeepaliveMismatch,
			Cause:    "something on the path cuts idle connections at about 240 s, before the device's keepalive of 300 s",
			Evidence: map[string]any{"idle_seconds": 240, "keepalive": 300, "sessions": 3, "lost_connections": 5},
			Fix:      "use a keepalive below 240 s (e.g. 120 s) for this device or model",
			Remedy:   &Remedy{Config: map[string]any{ConfigKeepalive: 120}},
		}}},
		{"idle times too spread", cat(
			session(30*time.Minute, 1, "203.0.113.7:50000", cutAt(20000)),
			session(20*time.Minute, 2, "203.0.113.7:50000", cutAt(30000)),
			session(10*time.Minute, 3, "203.0.113.7:50000", cutAt(45000)),
		), nil, nil},
		{"broker deadline at 1.5 keepalive is not a path cut but a stall", cat(
			session(30*time.Minute, 1, "203.0.113.7:50000", Event{Reason: ReasonKeepaliveTimeout, Pings: 4, IdleMillis: 90000}),
			session(20*time.Minute, 2, "203.0.113.7:50000", Event{Reason: ReasonKeepaliveTimeout, Pings: 4, IdleMillis: 90100}),
			session(10*time.Minute, 3, "203.0.113.7:50000", Event{Reason: ReasonKeepaliveTimeout, Pings: 4, IdleMillis: 89900}),
		), nil, []Problem{{
			Code:     ProblemStalls,
			Cause:    "the device stops talking with its connection open: 3 sessions hit the keepalive deadline after it had been pinging (the last after 4 pings)",
			Evidence: map[string]any{"sessions": 3, "keepalive": 60, "last_at": diagNow.Add(-9 * time.Minute), "firmware": "1.0.3"},
			Fix:      fixStalls,
		}}},
		{"random drops at idle times over the whole keepalive are not a path cut", func() []Event {
			var out []Event
			for i, idle := range []int{3100, 3300, 3500, 900, 1500, 2600, 200, 3800, 1200, 2100} {
				out = append(out, session(time.Duration(50-4*i)*time.Minute, int64(i+1), "203.0.113.7:50000",
					Event{Reason: ReasonConnectionLost, Pings: 1, IdleMillis: idle, KeepaliveRequested: 4})...)
			}
			return out
		}(), nil, nil},
		{"a session that survived a longer silence disproves the cut", cat(
			session(40*time.Minute, 1, "203.0.113.7:50000", cutAt(30000)),
			session(30*time.Minute, 2, "203.0.113.7:50000", cutAt(29500)),
			session(20*time.Minute, 3, "203.0.113.7:50000", cutAt(31000)),
			session(10*time.Minute, 4, "203.0.113.7:50000", Event{Reason: ReasonConnectionLost, Pings: 3, IdleMillis: 5000, MaxSilenceMillis: 59000}),
		), nil, nil},
		{"a device that stopped reading is not cut", func() []Event {
			var out []Event
			for i := range 3 {
				out = append(out, session(time.Duration(30-10*i)*time.Minute, int64(i+1), "203.0.113.7:50000",
					Event{Reason: ReasonConnectionLost, Detail: DetailWriteTimeoutPrefix + ": the client stopped reading", IdleMillis: 30000})...)
			}
			return out
		}(), nil, nil},
		{"drops while sending are not idle cuts", cat(
			session(30*time.Minute, 1, "203.0.113.7:50000", cutAt(400)),
			session(20*time.Minute, 2, "203.0.113.7:50000", cutAt(420)),
			session(10*time.Minute, 3, "203.0.113.7:50000", cutAt(410)),
		), nil, nil},
		{"clean disconnects after idling are not cuts", sessions(3, 30*time.Minute, 10*time.Minute, Event{Reason: ReasonClientDisconnect, IdleMillis: 30000}), nil, nil},
		{"keepalive off", []Event{
			ev(30*time.Minute, Event{Kind: KindDisconnect, Reason: ReasonConnectionLost, SessionEpoch: 1, IdleMillis: 118000}),
			ev(20*time.Minute, Event{Kind: KindDisconnect, Reason: ReasonConnectionLost, SessionEpoch: 2, IdleMillis: 120000}),
			ev(10*time.Minute, Event{Kind: KindDisconnect, Reason: ReasonConnectionLost, SessionEpoch: 3, IdleMillis: 121000}),
		}, nil, []Problem{{
			Code:     ProblemKeepaliveMismatch,
			Cause:    "something on the path cuts idle connections at about 120 s, and the device has keepalive off",
			Evidence: map[string]any{"idle_seconds": 120, "keepalive": 0, "sessions": 3, "lost_connections": 3},
			Fix:      "use a keepalive below 120 s (e.g. 60 s) for this device or model",
			Remedy:   &Remedy{Config: map[string]any{ConfigKeepalive: 60}},
		}}},
		{"one cut outside the window", cat(
			session(70*time.Minute, 1, "203.0.113.7:50000", cutAt(30000)),
			session(20*time.Minute, 2, "203.0.113.7:50000", cutAt(29500)),
			session(10*time.Minute, 3, "203.0.113.7:50000", cutAt(31000)),
		), nil, nil},

		// flapping
		{"six sessions in ten minutes", sessions(6, 9*time.Minute, 90*time.Second, lost), nil, nil},
		{"seven sessions in ten minutes", sessions(7, 9*time.Minute+30*time.Second, 90*time.Second, lost), nil, []Problem{{
			Code:  ProblemFlapping,
			Cause: "the device started 7 sessions within 10m0s; most sessions ended with connection_lost",
			Evidence: map[string]any{"sessions": 7, "window": "10m0s", "dominant_reason": "connection_lost",
				"reasons": map[string]int{"connection_lost": 7}},
			Fix: fixFlapLost,
		}}},
		{"seven sessions exactly ten minutes apart", sessions(7, 10*time.Minute, 100*time.Second, lost), nil, nil},
		{"seven sessions spread over twelve minutes", sessions(7, 13*time.Minute, 2*time.Minute, lost), nil, nil},
		{"seven sessions outside the window", sessions(7, 75*time.Minute, 90*time.Second, lost), nil, nil},
		{"flapping on keepalive timeouts", cat(
			sessions(7, 9*time.Minute+30*time.Second, 90*time.Second, Event{Reason: ReasonKeepaliveTimeout, Pings: 2, IdleMillis: 90000}),
			session(40*time.Minute, 20, "203.0.113.7:50000", clean),
		), nil, []Problem{{
			Code:     ProblemStalls,
			Cause:    "the device stops talking with its connection open: 7 sessions hit the keepalive deadline after it had been pinging (the last after 2 pings)",
			Evidence: map[string]any{"sessions": 7, "keepalive": 60, "last_at": diagNow.Add(30 * time.Second), "firmware": "1.0.3"},
			Fix:      fixStalls,
		}, {
			Code:  ProblemFlapping,
			Cause: "the device started 7 sessions within 10m0s; most sessions ended with keepalive_timeout",
			Evidence: map[string]any{"sessions": 7, "window": "10m0s", "dominant_reason": "keepalive_timeout",
				"reasons": map[string]int{"keepalive_timeout": 7, "client_disconnect": 1}},
			Fix: "the device goes silent past its keepalive: see no_pings (it never pings) or stalls (it hangs)",
		}}},

		// tls_handshake_failures
		{"expired certificate", []Event{
			refusal(20*time.Minute, ReasonTLSHandshakeFailed, "tls: failed to verify certificate: x509: certificate signed by unknown authority"),
			refusal(5*time.Minute, ReasonTLSHandshakeFailed, "tls: failed to verify certificate: x509: certificate has expired or is not yet valid"),
		}, nil, []Problem{{
			Code:  ProblemTLSHandshakeFailures,
			Cause: `TLS handshakes fail: "tls: failed to verify certificate: x509: certificate has expired or is not yet valid"`,
			Evidence: map[string]any{"failures": 2, "detail": "tls: failed to verify certificate: x509: certificate has expired or is not yet valid",
				"last_at": diagNow.Add(-5 * time.Minute), "addresses": []string{"198.51.100.4"}},
			Fix: "renew the device's certificate (or set the device's clock if it is wrong)",
		}}},
		{"TLS failure outside the window", []Event{refusal(61*time.Minute, ReasonTLSHandshakeFailed, "EOF")}, nil, nil},

		// auth_failures
		{"two auth failures", []Event{
			refusal(20*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(10*time.Minute, ReasonAuthFailed, "wrong token"),
		}, nil, nil},
		{"three auth failures", []Event{
			refusal(30*time.Minute, ReasonAuthFailed, "user name must be the device id"),
			refusal(20*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(10*time.Minute, ReasonAuthFailed, "wrong token"),
		}, nil, []Problem{{
			Code:  ProblemAuthFailures,
			Cause: `the broker refused the device's credentials 3 times: "wrong token"`,
			Evidence: map[string]any{"failures": 3, "detail": "wrong token", "last_at": diagNow.Add(-10 * time.Minute),
				"details": map[string]int{"wrong token": 2, "user name must be the device id": 1}},
			Fix: "rotate the device's token and provision it",
		}}},
		{"unknown device, the latest of a tie", []Event{
			refusal(40*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(30*time.Minute, ReasonAuthFailed, "unknown device"),
			refusal(20*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(10*time.Minute, ReasonAuthFailed, "unknown device"),
		}, nil, []Problem{{
			Code:  ProblemAuthFailures,
			Cause: `the broker refused the device's credentials 4 times: "unknown device"`,
			Evidence: map[string]any{"failures": 4, "detail": "unknown device", "last_at": diagNow.Add(-10 * time.Minute),
				"details": map[string]int{"wrong token": 2, "unknown device": 2}},
			Fix: "register the device",
		}}},
		{"third auth failure outside the window", []Event{
			refusal(90*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(20*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(10*time.Minute, ReasonAuthFailed, "wrong token"),
		}, nil, nil},
		{"other refusals are not auth failures", []Event{
			refusal(30*time.Minute, ReasonThrottled, "broker connect rate exceeded"),
			refusal(20*time.Minute, ReasonThrottled, "broker connect rate exceeded"),
			refusal(10*time.Minute, ReasonThrottled, "broker connect rate exceeded"),
		}, nil, nil},
		{"failed authentications the per-source limit throttled are auth failures", []Event{
			refusal(30*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(20*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(10*time.Minute, ReasonThrottled, DetailFailedAuthPrefix+" from this address (this one: wrong token)"),
		}, nil, []Problem{{
			Code:  ProblemAuthFailures,
			Cause: `the broker refused the device's credentials 3 times: "wrong token"`,
			Evidence: map[string]any{"failures": 3, "detail": "wrong token", "last_at": diagNow.Add(-10 * time.Minute),
				"details": map[string]int{"wrong token": 2, DetailFailedAuthPrefix + " from this address (this one: wrong token)": 1}},
			Fix: "rotate the device's token and provision it",
		}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Diagnose(dev, tt.events, tt.incompat, diagNow, p)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestDiagnoseCauses covers the causes one or two occurrences prove, each
// next to the near miss that must not name it.
func TestDiagnoseCauses(t *testing.T) {
	p := DefaultDiagnosisPolicy()
	dev := Device{ID: "gw-1", Model: "gw-100", Firmware: "1.0.3", ProtocolVersion: 4, KeepaliveRequested: 60}
	retired := dev
	retired.State = StateDecommissioned
	// A session that hit the deadline without a ping: silent after talking
	// for talked ms (CONNECT, birth), then 1.5 × 60 s to the deadline.
	silent := func(talked int64, pings int) Event {
		return Event{Reason: ReasonKeepaliveTimeout, Pings: pings, IdleMillis: 90000, DurationMillis: talked + 90000}
	}
	tooBig := Event{Reason: ReasonPacketTooLarge, Detail: "a packet above the maximum packet size of 262144 bytes", Pings: 1, IdleMillis: 10}
	retry := func(ago time.Duration) Event {
		return ev(ago, Event{Kind: KindRefused, Reason: ReasonDecommissioned, Detail: "device is decommissioned", RemoteAddr: "198.51.100.4:41000"})
	}
	noPingsProblem := func(n int) []Problem {
		return []Problem{{Code: ProblemNoPings, Cause: "the device never sends PINGREQ: its firmware does not keep the session alive",
			Evidence: map[string]any{"sessions": n, "firmware": "1.0.3"}, Fix: fixUpgradeFirmware}}
	}
	tests := []struct {
		name   string
		dev    Device
		events []Event
		want   []Problem
	}{
		// no_pings from one session that proves it.
		{"one timeout, silent from its first keepalive period", dev, session(5*time.Minute, 1, "203.0.113.7:50000", silent(300, 0)), noPingsProblem(1)},
		{"one timeout after publishing past the first period", dev, session(5*time.Minute, 1, "203.0.113.7:50000", silent(120000, 0)), nil},
		{"one silent timeout on a firmware seen pinging", dev, cat(
			session(20*time.Minute, 1, "203.0.113.7:50000", clean),
			session(5*time.Minute, 2, "203.0.113.7:50000", silent(300, 0)),
		), nil},
		{"timeouts on the firmware a campaign replaced", dev, cat(
			session(30*time.Minute, 1, "203.0.113.7:50000", Event{Reason: ReasonKeepaliveTimeout, IdleMillis: 90000, Firmware: "0.9.0"}),
			session(20*time.Minute, 2, "203.0.113.7:50000", Event{Reason: ReasonKeepaliveTimeout, IdleMillis: 90000, Firmware: "0.9.0"}),
		), nil},

		// stalls
		{"one stall is a lost link", dev, session(5*time.Minute, 1, "203.0.113.7:50000", silent(40000, 1)), nil},
		{"two stalls", dev, cat(
			session(20*time.Minute, 1, "203.0.113.7:50000", silent(40000, 1)),
			session(5*time.Minute, 2, "203.0.113.7:50000", silent(200000, 3)),
		), []Problem{{
			Code:     ProblemStalls,
			Cause:    "the device stops talking with its connection open: 2 sessions hit the keepalive deadline after it had been pinging (the last after 3 pings); it went silent about 200 s into a session",
			Evidence: map[string]any{"sessions": 2, "keepalive": 60, "last_at": diagNow.Add(-4 * time.Minute), "firmware": "1.0.3", "talked_seconds": 200},
			Fix:      fixStalls,
		}}},

		// oversized_packets
		{"one oversized packet", dev, session(5*time.Minute, 1, "203.0.113.7:50000", tooBig), []Problem{{
			Code:     ProblemOversizedPackets,
			Cause:    "the device sends packets larger than the broker accepts: 1 sessions ended for it (a packet above the maximum packet size of 262144 bytes)",
			Evidence: map[string]any{"sessions": 1, "detail": tooBig.Detail, "last_at": diagNow.Add(-4 * time.Minute), "firmware": "1.0.3"},
			Fix:      "make the firmware split or shrink its messages, or raise FLEETD_MQTT_MAX_PACKET if such messages are expected",
		}}},

		// throttled
		{"one throttled reconnect", dev, []Event{refusal(2*time.Minute, ReasonThrottled, DetailReconnectsTooOften)}, []Problem{{
			Code:     ProblemThrottled,
			Cause:    "the broker throttles the device: it refused 1 connects because it reconnects too often",
			Evidence: map[string]any{"refused_connects": 1, "ended_sessions": 0, "last_at": diagNow.Add(-2 * time.Minute)},
			Fix:      "make the device reconnect with exponential backoff and jitter",
		}}},
		{"a session ended for its message rate", dev, session(5*time.Minute, 1, "203.0.113.7:50000", Event{Reason: ReasonThrottled, Detail: "message rate too high"}), []Problem{{
			Code:     ProblemThrottled,
			Cause:    "the broker throttles the device: it ended 1 sessions because it sent messages faster than a session may",
			Evidence: map[string]any{"refused_connects": 0, "ended_sessions": 1, "last_at": diagNow.Add(-4 * time.Minute)},
			Fix:      "make it publish less often (or raise FLEETD_MQTT_PUBLISH_RATE)",
		}}},
		{"the broker's own connect rate is not the device's doing", dev, []Event{refusal(2*time.Minute, ReasonThrottled, "broker connect rate exceeded")}, nil},

		// decommissioned_retrying
		{"a decommissioned device still trying", retired, []Event{retry(30 * time.Minute), retry(20 * time.Minute), retry(10 * time.Minute)}, []Problem{{
			Code:  ProblemDecommissionedRetrying,
			Cause: "the device is decommissioned but still tries to connect: 3 attempts in the last 1h0m0s (every 10m0s) from 198.51.100.4, the last at 2025-03-01T11:50:00Z",
			Evidence: map[string]any{"attempts": 3, "addresses": []string{"198.51.100.4"}, "first_at": diagNow.Add(-30 * time.Minute),
				"last_at": diagNow.Add(-10 * time.Minute), "decommissioned_at": (*time.Time)(nil)},
			Fix: "find the device at these addresses and switch it off or wipe it; register it again if it should be back in the fleet",
		}}},
		{"a decommissioned device that went quiet", retired, []Event{retry(70 * time.Minute)}, nil},
		{"an active device is not retired", dev, []Event{retry(10 * time.Minute)}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Diagnose(tt.dev, tt.events, nil, diagNow, p)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestDiagnoseOrder checks that problems come most severe first, whatever
// the order of the events.
func TestDiagnoseOrder(t *testing.T) {
	events := cat(
		[]Event{
			refusal(59*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(58*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(57*time.Minute, ReasonAuthFailed, "wrong token"),
			refusal(56*time.Minute, ReasonTLSHandshakeFailed, "EOF"),
			// Someone else, at an address the device never connects from.
			ev(55*time.Minute, Event{Kind: KindRefused, Reason: ReasonAuthFailed, Detail: "wrong token", RemoteAddr: "192.0.2.1:1"}),
			ev(54*time.Minute, Event{Kind: KindRefused, Reason: ReasonAuthFailed, Detail: "wrong token", RemoteAddr: "192.0.2.1:2"}),
			ev(53*time.Minute, Event{Kind: KindRefused, Reason: ReasonAuthFailed, Detail: "wrong token", RemoteAddr: "192.0.2.1:3"}),
		},
		// The refusals above from 198.51.100.4 are the device's own: it connects from there too.
		session(45*time.Minute, 50, "198.51.100.4:41000", clean),
		sessions(7, 9*time.Minute, 80*time.Second, cutAt(30000)),
		takeover(30*time.Minute, 100, "203.0.113.7:50000", "198.51.100.9:61000"),
		takeover(29*time.Minute, 101, "198.51.100.9:61000", "203.0.113.7:50000"),
		session(40*time.Minute, 200, "203.0.113.7:50000", noPingKA),
		session(39*time.Minute, 201, "203.0.113.7:50000", noPingKA),
		session(38*time.Minute, 202, "203.0.113.7:50000", badPing),
		session(37*time.Minute, 203, "203.0.113.7:50000", Event{Reason: ReasonKeepaliveTimeout, Pings: 3, IdleMillis: 90000}),
		session(36*time.Minute, 204, "203.0.113.7:50000", Event{Reason: ReasonKeepaliveTimeout, Pings: 3, IdleMillis: 90000}),
		session(35*time.Minute, 205, "203.0.113.7:50000", Event{Reason: ReasonPacketTooLarge}),
		[]Event{
			refusal(34*time.Minute, ReasonThrottled, DetailReconnectsTooOften),
			refusal(33*time.Minute, ReasonDecommissioned, "device is decommissioned"),
		},
	)
	// Newest first, as the store returns them.
	for i, j := 0, len(events)-1; i < j; i, j = i+1, j-1 {
		events[i], events[j] = events[j], events[i]
	}
	dev := Device{ID: "gw-1", Firmware: "1.0.3", ProtocolVersion: 5, State: StateDecommissioned}
	got := Diagnose(dev, events, []Incompatibility{{IncompatRejectsPings, "rejects pings"}}, diagNow, DefaultDiagnosisPolicy())
	var codes []string
	for _, pr := range got {
		codes = append(codes, pr.Code)
	}
	want := []string{
		ProblemIncompatibleFirmware, ProblemMalformedPings, ProblemNoPings, ProblemStalls, ProblemOversizedPackets,
		ProblemDuplicateClientID, ProblemKeepaliveMismatch, ProblemThrottled, ProblemFlapping, ProblemTLSHandshakeFailures,
		ProblemAuthFailures, ProblemIDUsedElsewhere, ProblemDecommissionedRetrying,
	}
	if diff := cmp.Diff(want, codes); diff != "" {
		t.Errorf("mismatch (-want +got):\n%s", diff)
	}
}

func TestDiagnoseTLSFix(t *testing.T) {
	tests := []struct {
		name, detail, want string
	}{
		{"device certificate expired", "tls: failed to verify certificate: x509: certificate has expired or is not yet valid",
			"renew the device's certificate (or set the device's clock if it is wrong)"},
		{"device sees the server's certificate expired", "remote error: tls: expired certificate",
			"renew the server's certificate, or set the device's clock if it is wrong"},
		{"device certificate from another CA", "tls: failed to verify certificate: x509: certificate signed by unknown authority",
			"issue the device's certificate from the configured device CA"},
		{"alert name", "alert unknown_ca", "issue the device's certificate from the configured device CA"},
		{"device does not trust the server", "remote error: tls: unknown certificate authority",
			"install the CA that signed the server's certificate on the device"},
		{"old TLS", "tls: client offered only unsupported versions: [301]",
			"enable TLS 1.2 or later on the device, or upgrade its firmware"},
		{"anything else", "EOF", "check the device's TLS settings: its certificate, the CA it trusts and its TLS version"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, tlsFix(tt.detail)); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDiagnoseFlapFix(t *testing.T) {
	// A flapping device whose stale sessions are taken over by its own
	// reconnects, from one address: flapping, and no clone.
	events := []Event{}
	for i := range 7 {
		events = append(events, takeover(time.Duration(9-i)*time.Minute, int64(i+1), "203.0.113.7:50000", "203.0.113.7:50001")...)
	}
	got := Diagnose(Device{ID: "gw-1"}, events, nil, diagNow, DefaultDiagnosisPolicy())
	want := []Problem{{
		Code:  ProblemFlapping,
		Cause: "the device started 7 sessions within 10m0s; most sessions ended with session_takeover",
		Evidence: map[string]any{"sessions": 7, "window": "10m0s", "dominant_reason": "session_takeover",
			"reasons": map[string]int{"session_takeover": 7}},
		Fix: "another device uses this client id (see duplicate_client_id): give each device its own id and token",
	}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("mismatch (-want +got):\n%s", diff)
	}
}

func TestKeepalivePolicyProblem(t *testing.T) {
	tests := []struct {
		name      string
		protocol  Protocol
		requested int
		cap       int
		want      bool
	}{
		{"v3 above cap", 4, 60, 20, true},
		{"v3 without keepalive", 4, 0, 20, true},
		{"v3 within cap", 4, 20, 20, false},
		{"v5 is told by the broker", 5, 60, 20, false},
		{"no cap", 4, 600, 0, false},
		{"never connected", 0, 0, 20, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := Device{ID: "d", Model: "gw-100", ProtocolVersion: tt.protocol, KeepaliveRequested: tt.requested}
			if got := keepalivePolicyProblem(d, tt.cap) != nil; got != tt.want {
				t.Fatalf("problem = %v, want %v", got, tt.want)
			}
		})
	}
}

// Refused attempts are unauthenticated: whoever holds a device's id can make
// them. Those from where the device never connects are someone else's, and
// must not read as the device's own wrong credentials.
func TestDiagnoseIDUsedElsewhere(t *testing.T) {
	own := "203.0.113.7:50000"
	from := func(ago time.Duration, r Reason, detail, addr string) Event {
		return ev(ago, Event{Kind: KindRefused, Reason: r, Detail: detail, RemoteAddr: addr})
	}
	codes := func(ps []Problem) []string {
		var out []string
		for _, p := range ps {
			out = append(out, p.Code)
		}
		return out
	}
	for _, tc := range []struct {
		name   string
		events []Event
		want   []string
	}{
		{"wrong token from another address", cat(session(50*time.Minute, 1, own, clean), []Event{
			from(30*time.Minute, ReasonAuthFailed, "wrong token", "198.51.100.9:4000"),
			from(20*time.Minute, ReasonAuthFailed, "wrong token", "198.51.100.9:4001"),
			from(10*time.Minute, ReasonAuthFailed, "wrong token", "198.51.100.9:4002"),
		}), []string{ProblemIDUsedElsewhere}},
		{"self-signed certificate naming the device", cat(session(50*time.Minute, 1, own, clean), []Event{
			from(10*time.Minute, ReasonTLSHandshakeFailed, "unknown_ca: tls: failed to verify certificate: x509: certificate signed by unknown authority", "198.51.100.9:4000"),
		}), []string{ProblemIDUsedElsewhere}},
		{"self-signed certificate before the device ever connected", []Event{
			from(10*time.Minute, ReasonTLSHandshakeFailed, "unknown_ca: tls: failed to verify certificate: x509: certificate signed by unknown authority", "198.51.100.9:4000"),
		}, []string{ProblemTLSHandshakeFailures}},
		{"self-signed certificate from where the device connects", cat(session(50*time.Minute, 1, own, clean), []Event{
			from(10*time.Minute, ReasonTLSHandshakeFailed, "unknown_ca: tls: failed to verify certificate: x509: certificate signed by unknown authority", "203.0.113.7:50001"),
		}), []string{ProblemIDUsedElsewhere}},
		{"wrong token from where the device connects", cat(session(50*time.Minute, 1, own, clean), []Event{
			from(30*time.Minute, ReasonAuthFailed, "wrong token", "203.0.113.7:50001"),
			from(20*time.Minute, ReasonAuthFailed, "wrong token", "203.0.113.7:50002"),
			from(10*time.Minute, ReasonAuthFailed, "wrong token", "203.0.113.7:50003"),
		}), []string{ProblemAuthFailures}},
		{"both", cat(session(50*time.Minute, 1, own, clean), []Event{
			from(30*time.Minute, ReasonAuthFailed, "wrong token", "203.0.113.7:50001"),
			from(20*time.Minute, ReasonAuthFailed, "wrong token", "203.0.113.7:50002"),
			from(10*time.Minute, ReasonAuthFailed, "wrong token", "203.0.113.7:50003"),
			from(9*time.Minute, ReasonAuthFailed, "wrong token", "192.0.2.1:1"),
			from(8*time.Minute, ReasonAuthFailed, "wrong token", "192.0.2.1:2"),
			from(7*time.Minute, ReasonAuthFailed, "wrong token", "192.0.2.1:3"),
		}), []string{ProblemAuthFailures, ProblemIDUsedElsewhere}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := codes(Diagnose(Device{ID: "gw-1"}, tc.events, nil, diagNow, DefaultDiagnosisPolicy()))
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Fatalf("problems mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestKeepaliveMismatchCleared: three idle cuts at 30 s name the mismatch;
// once the newest session runs on a keepalive below the cut and has
// outlived three cuts (live, or ended otherwise than by losing its
// connection), the problem is reported cleared, with why.
func TestKeepaliveMismatchCleared(t *testing.T) {
	p := DefaultDiagnosisPolicy()
	dev := Device{ID: "gw-1", Model: "gw-100", Firmware: "1.0.3", ProtocolVersion: 4, KeepaliveRequested: 60}
	cuts := cat(
		session(40*time.Minute, 1, "203.0.113.7:50000", cutAt(30000)),
		session(30*time.Minute, 2, "203.0.113.7:50000", cutAt(29500)),
		session(20*time.Minute, 3, "203.0.113.7:50000", cutAt(31000)),
	)
	connect := func(ago time.Duration, keepalive int) Event {
		return ev(ago, Event{Kind: KindConnect, SessionEpoch: 4, RemoteAddr: "203.0.113.7:50000", KeepaliveRequested: keepalive})
	}
	end := func(ago time.Duration, r Reason) Event {
		return ev(ago, Event{Kind: KindDisconnect, SessionEpoch: 4, Reason: r, RemoteAddr: "203.0.113.7:50000", KeepaliveRequested: 15, Pings: 6})
	}
	live := dev
	live.Online, live.SessionEpoch, live.KeepaliveRequested = true, 4, 15
	tests := []struct {
		name    string
		d       Device
		events  []Event
		cleared string
	}{
		{"no session since the cuts", dev, cuts, ""},
		{"live on keepalive 15 for 2 min", live, cat(cuts, []Event{connect(2*time.Minute, 15)}),
			"since 2025-03-01T11:58:00Z the device connects with a keepalive of 15 s, and that session has lasted 2m0s, 4 times the 30 s cut"},
		{"live on keepalive 15 for 80 s: under three cuts", live, cat(cuts, []Event{connect(80*time.Second, 15)}), ""},
		{"live, still on keepalive 60", func() Device { d := live; d.KeepaliveRequested = 60; return d }(), cat(cuts, []Event{connect(5*time.Minute, 60)}), ""},
		{"ended cleanly after 100 s on keepalive 15", dev, cat(cuts, []Event{connect(5*time.Minute, 15), end(5*time.Minute-100*time.Second, ReasonClientDisconnect)}),
			"since 2025-03-01T11:55:00Z the device connects with a keepalive of 15 s, and that session has lasted 1m40s, 3 times the 30 s cut"},
		{"lost again on keepalive 15", dev, cat(cuts, []Event{connect(5*time.Minute, 15), end(2*time.Minute, ReasonConnectionLost)}), ""},
		{"offline with no end stored", dev, cat(cuts, []Event{connect(5*time.Minute, 15)}), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got *Problem
			for _, pr := range Diagnose(tt.d, tt.events, nil, diagNow, p) {
				if pr.Code == ProblemKeepaliveMismatch {
					got = &pr
				}
			}
			if got == nil {
				t.Fatal("no keepalive_mismatch: the cuts are still in the window")
			}
			if got.Cleared != tt.cleared {
				t.Errorf("cleared = %q, want %q", got.Cleared, tt.cleared)
			}
		})
	}
}
