package fleet

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// sessions writes n sessions per device: each a connect, a birth and a
// disconnect with the given reason, spread over the hour before at.
func writeSessions(t *testing.T, svc *Service, ids []string, model, firmware string, proto Protocol, n int, reason Reason, detail string, at time.Time) {
	t.Helper()
	var events []Event
	for _, id := range ids {
		for i := range n {
			start := at.Add(-time.Hour + time.Duration(i)*time.Hour/time.Duration(n))
			end := start.Add(time.Hour / time.Duration(n) / 2)
			epoch := start.UnixMicro()
			events = append(events,
				Event{ID: NewEventID(start), DeviceID: id, At: start, Kind: KindConnect, SessionEpoch: epoch, Model: model, Firmware: firmware, ProtocolVersion: proto, KeepaliveRequested: 30},
				Event{ID: NewEventID(start), DeviceID: id, At: start.Add(time.Millisecond), Kind: KindBirth, SessionEpoch: epoch, Model: model, Firmware: firmware},
				Event{ID: NewEventID(end), DeviceID: id, At: end, Kind: KindDisconnect, Reason: reason, Detail: detail, SessionEpoch: epoch, Model: model, Firmware: firmware, ProtocolVersion: proto})
		}
	}
	if err := svc.store.writeEvents(context.Background(), events); err != nil {
		t.Fatal(err)
	}
}

func register(t *testing.T, svc *Service, model string, ids ...string) {
	t.Helper()
	for _, id := range ids {
		if _, _, err := svc.Register(context.Background(), NewDevice{ID: id, Model: model}); err != nil {
			t.Fatal(err)
		}
	}
}

func incompatibleIDs(t *testing.T, svc *Service) map[string][]string {
	t.Helper()
	ds, _, err := svc.List(context.Background(), Filter{Compat: "incompatible"})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, d := range ds {
		for _, in := range d.Incompatibilities {
			out[d.ID] = append(out[d.ID], in.Reason)
		}
	}
	return out
}

func TestAnalysisFlagsFirmwareThatRejectsPings(t *testing.T) {
	ctx := context.Background()
	svc, _ := newService(t)
	now := time.Now()
	svc.now = func() time.Time { return now }
	if err := svc.LoadPolicy(ctx); err != nil {
		t.Fatal(err)
	}
	register(t, svc, "gw-100", "bad-1", "bad-2", "bad-3", "ok-1", "ok-2", "ok-3", "few-1")
	writeSessions(t, svc, []string{"bad-1", "bad-2", "bad-3"}, "gw-100", "1.0.3", 4, 6, ReasonProtocolError, "PINGREQ with reserved flags 0x2", now)
	writeSessions(t, svc, []string{"ok-1", "ok-2", "ok-3"}, "gw-100", "1.2.0", 4, 2, ReasonClientDisconnect, "", now)
	writeSessions(t, svc, []string{"few-1"}, "gw-100", "0.9.0", 4, 2, ReasonKeepaliveTimeout, "", now) // one device: too small a sample

	if err := svc.Analyze(ctx); err != nil {
		t.Fatal(err)
	}
	got := incompatibleIDs(t, svc)
	if len(got) != 3 || got["bad-1"][0] != IncompatRejectsPings || got["few-1"] != nil || got["ok-1"] != nil {
		t.Fatalf("incompatible devices: %v; want bad-1..3 (rejects_pings) only", got)
	}
	// The flag and the devices it made incompatible are told (package
	// notify delivers them): one notification per model and firmware.
	var notes []string
	rows, _ := svc.store.pool.Query(ctx, `SELECT type || ' ' || (payload->>'firmware') || ' ' || coalesce(payload->>'devices', '-') FROM notifications ORDER BY id`)
	for rows.Next() {
		var n string
		rows.Scan(&n)
		notes = append(notes, n)
	}
	rows.Close()
	if strings.Join(notes, ", ") != "firmware.flagged 1.0.3 -, devices.incompatible 1.0.3 3" {
		t.Fatalf("notifications: %q", notes)
	}
	verdicts, _ := svc.Verdicts(ctx)
	if len(verdicts) != 1 || verdicts[0].Firmware != "1.0.3" || !verdicts[0].Active || verdicts[0].Evidence == nil ||
		verdicts[0].Evidence.PingDisconnects != 18 || len(verdicts[0].Evidence.Samples) == 0 {
		t.Fatalf("verdicts: %+v", verdicts)
	}
	diag, err := svc.Diagnose(ctx, "bad-2")
	if err != nil {
		t.Fatal(err)
	}
	codes := map[string]bool{}
	for _, p := range diag.Problems {
		codes[p.Code] = true
	}
	if !codes[ProblemIncompatibleFirmware] || !codes[ProblemMalformedPings] || len(diag.Incompatibilities) != 1 {
		t.Fatalf("diagnosis of bad-2: %+v", diag)
	}
	if d, _ := svc.Diagnose(ctx, "ok-1"); len(d.Problems) != 0 {
		t.Fatalf("healthy device has problems: %+v", d.Problems)
	}

	// The operator overrides: the firmware is no longer flagged.
	if err := svc.DecideVerdict(ctx, "gw-100", "1.0.3", "overridden"); err != nil {
		t.Fatal(err)
	}
	svc.Analyze(ctx)
	if got := incompatibleIDs(t, svc); len(got) != 0 {
		t.Fatalf("after override: %v", got)
	}
	// The evidence ages out of a shorter window: the learned verdict expires,
	// but an operator's confirmation keeps the firmware flagged.
	if err := svc.DecideVerdict(ctx, "gw-100", "1.0.3", "confirmed"); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.SetPolicy(ctx, Policy{VerdictWindowSeconds: 3600}); err != nil {
		t.Fatal(err)
	}
	now = now.Add(3 * time.Hour)
	svc.Analyze(ctx)
	verdicts, _ = svc.Verdicts(ctx)
	if verdicts[0].Learned || !verdicts[0].Active {
		t.Fatalf("after the evidence aged out: %+v; want expired but confirmed", verdicts[0])
	}
	if got := incompatibleIDs(t, svc); len(got) != 3 {
		t.Fatalf("confirmed verdict no longer applies: %v", got)
	}
	svc.DecideVerdict(ctx, "gw-100", "1.0.3", "")
	svc.Analyze(ctx)
	if got := incompatibleIDs(t, svc); len(got) != 0 {
		t.Fatalf("expired verdict still applies: %v", got)
	}
	if err := svc.DecideVerdict(ctx, "gw-100", "1.0.3", "maybe"); !errors.As(err, new(*ValidationError)) {
		t.Fatalf("bad decision: %v", err)
	}
}

func TestPolicyRulesAndKeepalive(t *testing.T) {
	ctx := context.Background()
	svc, _ := newService(t)
	now := time.Now()
	register(t, svc, "gw-100", "old", "v3-on-new", "v5-on-new")
	writeSessions(t, svc, []string{"old"}, "gw-100", "1.0.0", 4, 1, ReasonClientDisconnect, "", now)
	writeSessions(t, svc, []string{"v3-on-new"}, "gw-100", "2.0.1", 4, 1, ReasonClientDisconnect, "", now)
	writeSessions(t, svc, []string{"v5-on-new"}, "gw-100", "2.0.1", 5, 1, ReasonClientDisconnect, "", now)
	_, err := svc.SetPolicy(ctx, Policy{Models: map[string]ModelRules{"gw-100": {MinFirmware: "1.1.0",
		Firmware: []FirmwareRange{{Versions: ">=2.0.0", Protocols: []string{"5"}}}}}, Keepalive: KeepalivePolicy{MaxSeconds: 60, Models: map[string]int{"gw-100": 20}}})
	if err != nil {
		t.Fatal(err)
	}
	if svc.KeepaliveFor("gw-100") != 20 || svc.KeepaliveFor("other") != 60 {
		t.Fatalf("keepalive caps: %d %d", svc.KeepaliveFor("gw-100"), svc.KeepaliveFor("other"))
	}
	svc.Analyze(ctx)
	got := incompatibleIDs(t, svc)
	want := map[string]string{"old": IncompatBelowMinimum, "v3-on-new": IncompatProtocolUnsupported}
	if len(got) != 2 || got["old"][0] != want["old"] || got["v3-on-new"][0] != want["v3-on-new"] {
		t.Fatalf("incompatible: %v, want %v", got, want)
	}
	// A second analysis with nothing changed rewrites no device (the stored
	// jsonb renders its keys in another order than Go: compared decoded).
	var before, after time.Time
	pool := svc.store.pool
	if err := pool.QueryRow(ctx, `SELECT max(updated_at) FROM devices`).Scan(&before); err != nil {
		t.Fatal(err)
	}
	svc.Analyze(ctx)
	if err := pool.QueryRow(ctx, `SELECT max(updated_at) FROM devices`).Scan(&after); err != nil {
		t.Fatal(err)
	}
	if !after.Equal(before) {
		t.Fatalf("an analysis with nothing new rewrote devices (updated_at %s → %s)", before, after)
	}
	d, _ := svc.Diagnose(ctx, "v3-on-new")
	found := false
	for _, p := range d.Problems {
		found = found || p.Code == ProblemKeepaliveAbovePolicy
	}
	if !found {
		t.Fatalf("MQTT 3 device above the keepalive policy not reported: %+v", d.Problems)
	}
	// A new service (a restart, another replica) loads the stored policy.
	again := NewService(svc.store, svc.hasher, nil)
	if err := again.LoadPolicy(ctx); err != nil || again.KeepaliveFor("gw-100") != 20 {
		t.Fatalf("stored policy not loaded: %v %d", err, again.KeepaliveFor("gw-100"))
	}
	for _, bad := range []struct {
		p     Policy
		field string
	}{
		{Policy{Models: map[string]ModelRules{"gw-100": {MinFirmware: "one"}}}, "models.gw-100.min_firmware"},
		{Policy{Keepalive: KeepalivePolicy{MaxSeconds: -1}}, "keepalive.max_seconds"},
		{Policy{Verdicts: VerdictPolicy{RateRatio: -2}}, "verdicts.rate_ratio"},
		{Policy{Verdicts: VerdictPolicy{ClearFraction: -0.1}}, "verdicts.clear_fraction"},
		{Policy{Verdicts: VerdictPolicy{ClearFraction: 1.5}}, "verdicts.clear_fraction"},
	} {
		var ve *ValidationError
		if _, err := svc.SetPolicy(ctx, bad.p); !errors.As(err, &ve) || ve.Field != bad.field {
			t.Errorf("policy %+v: got %v, want a validation error on %s", bad.p, err, bad.field)
		}
	}
	if got := svc.Policy().VerdictPolicy().ClearFraction; got != 0.6 {
		t.Fatalf("clear fraction of a policy without one: %v, want the default 0.6", got)
	}
	if _, err := svc.SetPolicy(ctx, Policy{Verdicts: VerdictPolicy{ClearFraction: 1}}); err != nil {
		t.Fatalf("clear fraction 1 (no hysteresis): %v", err)
	}
}

func TestFleetHealth(t *testing.T) {
	ctx := context.Background()
	svc, _ := newService(t)
	now := time.Now()
	var flappy []Event
	register(t, svc, "gw-100", "flappy", "steady")
	for i := range 8 {
		at := now.Add(-time.Duration(8-i) * time.Minute)
		flappy = append(flappy, Event{ID: NewEventID(at), DeviceID: "flappy", At: at, Kind: KindConnect, SessionEpoch: int64(i + 1), Firmware: "1.2.0", ProtocolVersion: 4},
			Event{ID: NewEventID(at), DeviceID: "flappy", At: at.Add(time.Second), Kind: KindDisconnect, SessionEpoch: int64(i + 1), Reason: ReasonConnectionLost, Firmware: "1.2.0", ProtocolVersion: 4})
	}
	flappy = append(flappy, Event{ID: NewEventID(now), DeviceID: "steady", At: now, Kind: KindConnect, SessionEpoch: 100, Firmware: "2.0.1", ProtocolVersion: 5})
	if err := svc.store.writeEvents(ctx, flappy); err != nil {
		t.Fatal(err)
	}
	h, err := svc.FleetHealth(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if h.Devices.Total != 2 || h.Devices.Online != 1 || h.Devices.Offline != 1 {
		t.Fatalf("counts: %+v", h.Devices)
	}
	if len(h.Disconnects.LastHour) != 1 || h.Disconnects.LastHour[0] != (DisconnectCount{Firmware: "1.2.0", Protocol: 4, Reason: ReasonConnectionLost, Count: 8}) {
		t.Fatalf("disconnects last hour: %+v", h.Disconnects.LastHour)
	}
	if len(h.Flapping) != 1 || h.Flapping[0].ID != "flappy" || h.Flapping[0].Sessions != 8 || h.Flapping[0].DominantReason != ReasonConnectionLost {
		t.Fatalf("flapping: %+v", h.Flapping)
	}
	if fmt.Sprint(h.Incompatible.ByReason) != "map[]" || h.FlaggedFirmware == nil {
		t.Fatalf("incompatible/flagged: %+v %+v", h.Incompatible, h.FlaggedFirmware)
	}
}
