package fleet

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestVerdictHistory drives the analysis through flag → stay → clear: the
// firmware is flagged on the floor, stays flagged when the baseline rises to
// a ratio of 4 (under the threshold of 5, above 0.6 × 5), and is cleared at a
// ratio of 2. Exactly two flips are recorded.
func TestVerdictHistory(t *testing.T) {
	ctx := context.Background()
	svc, pool := newService(t)
	now := time.Now()
	svc.now = func() time.Time { return now }
	if err := svc.LoadPolicy(ctx); err != nil {
		t.Fatal(err)
	}
	bad, ok := []string{"bad-1", "bad-2", "bad-3"}, []string{"ok-1", "ok-2", "ok-3"}
	register(t, svc, "gw-100", append(bad, ok...)...)
	// 1.0.3: 18 ping-related disconnects over 1.5 device-hours, 12 an hour.
	writeSessions(t, svc, bad, "gw-100", "1.0.3", 4, 6, ReasonProtocolError, "PINGREQ with reserved flags 0x2", now)
	writeSessions(t, svc, ok, "gw-100", "1.2.0", 4, 2, ReasonClientDisconnect, "", now)

	type step struct {
		name         string
		incompatible int
		history      []string
	}
	check := func(s step) []VerdictChange {
		t.Helper()
		if err := svc.Analyze(ctx); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got := incompatibleIDs(t, svc); len(got) != s.incompatible {
			t.Fatalf("%s: incompatible devices %v, want %d", s.name, got, s.incompatible)
		}
		verdicts, err := svc.Verdicts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(verdicts) != 1 || verdicts[0].Firmware != "1.0.3" {
			t.Fatalf("%s: verdicts %+v", s.name, verdicts)
		}
		var changes []string
		for _, c := range verdicts[0].History {
			changes = append(changes, c.Change)
		}
		if strings.Join(changes, ",") != strings.Join(s.history, ",") {
			t.Fatalf("%s: history %v, want %v (newest first)", s.name, changes, s.history)
		}
		return verdicts[0].History
	}

	h := check(step{"flagged on the floor", 3, []string{"flagged"}})
	if h[0].Rate != 12 || h[0].Baseline != 0 || h[0].Evidence.PingDisconnects != 18 || h[0].Evidence.Samples != nil {
		t.Fatalf("flagged change: %+v", h[0])
	}
	check(step{"analysed again", 3, []string{"flagged"}})

	// 1.2.0 gets 9 ping-related disconnects over 1.5 more device-hours: 3 an
	// hour, a ratio of 4.
	writeSessions(t, svc, ok, "gw-100", "1.2.0", 4, 3, ReasonKeepaliveTimeout, "", now.Add(-time.Minute))
	check(step{"ratio 4: stays flagged", 3, []string{"flagged"}})
	verdicts, _ := svc.Verdicts(ctx)
	if ev := verdicts[0].Evidence; ev == nil || ev.FleetRate != 3 || !strings.Contains(ev.Evidence, "but flagged before") {
		t.Fatalf("held verdict's evidence: %+v", ev)
	}

	// 18 more over 1.5 device-hours: 27 over 4.5, 6 an hour, a ratio of 2.
	writeSessions(t, svc, ok, "gw-100", "1.2.0", 4, 6, ReasonKeepaliveTimeout, "", now.Add(-2*time.Minute))
	h = check(step{"ratio 2: cleared", 0, []string{"cleared", "flagged"}})
	if h[0].Rate != 12 || h[0].Baseline != 6 || !strings.Contains(h[0].Evidence.Evidence, "so the flag clears") || !h[0].At.After(h[1].At) {
		t.Fatalf("cleared change: %+v", h)
	}
	check(step{"analysed again", 0, []string{"cleared", "flagged"}})

	var rows int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM firmware_verdict_history`).Scan(&rows); err != nil || rows != 2 {
		t.Fatalf("history rows: %d, %v; want 2", rows, err)
	}

	// A verdict row without flips lists an empty history, never null.
	if err := svc.DecideVerdict(ctx, "gw-100", "9.9.9", "confirmed"); err != nil {
		t.Fatal(err)
	}
	verdicts, _ = svc.Verdicts(ctx)
	doc, _ := json.Marshal(verdicts[1])
	if verdicts[1].Firmware != "9.9.9" || !strings.Contains(string(doc), `"history":[]`) {
		t.Fatalf("verdict without history: %s", doc)
	}
}

// TestVerdictHistoryBound flips a verdict 60 times: the newest 50 rows are
// kept, the newest 20 shown, newest first, and another firmware's history is
// left alone.
func TestVerdictHistoryBound(t *testing.T) {
	ctx := context.Background()
	svc, pool := newService(t)
	key, other := FirmwareKey{"gw-100", "1.0.3"}, FirmwareKey{"gw-100", "1.0.4"}
	verdict := func(k FirmwareKey, rate float64) Verdict {
		return Verdict{Model: k.Model, Firmware: k.Firmware, Flag: IncompatRejectsPings, Rate: rate, FleetRate: 1, Evidence: "test"}
	}
	if saved, err := svc.store.saveLearned(ctx, nil, Learned{Flagged: []Verdict{verdict(other, 1)}}); err != nil || !saved {
		t.Fatalf("flag %v: %v, %v", other, saved, err)
	}
	before := map[FirmwareKey]bool{other: true}
	for i := range 60 {
		l := Learned{Flagged: []Verdict{verdict(other, 1)}}
		if i%2 == 0 {
			l.Flagged = append(l.Flagged, verdict(key, float64(i)))
		} else {
			l.Cleared = []Verdict{verdict(key, float64(i))}
		}
		saved, err := svc.store.saveLearned(ctx, before, l)
		if err != nil || !saved {
			t.Fatalf("flip %d: %v, %v", i, saved, err)
		}
		before = map[FirmwareKey]bool{other: true, key: i%2 == 0}
	}
	count := func(k FirmwareKey) int {
		t.Helper()
		var n int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM firmware_verdict_history WHERE model = $1 AND firmware = $2`, k.Model, k.Firmware).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := count(key); n != verdictHistoryKept {
		t.Fatalf("%d history rows kept, want %d", n, verdictHistoryKept)
	}
	if n := count(other); n != 1 {
		t.Fatalf("%d history rows of the other firmware, want 1", n)
	}
	var oldest float64
	if err := pool.QueryRow(ctx, `SELECT min(rate) FROM firmware_verdict_history WHERE firmware = $1`, key.Firmware).Scan(&oldest); err != nil || oldest != 10 {
		t.Fatalf("oldest kept flip: %v, %v; want flip 10", oldest, err)
	}
	verdicts, err := svc.Verdicts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	h := verdicts[0].History
	if verdicts[0].Firmware != key.Firmware || len(h) != verdictHistoryShown {
		t.Fatalf("verdict %s shows %d changes, want %d", verdicts[0].Firmware, len(h), verdictHistoryShown)
	}
	for i, c := range h {
		flip := 59 - i
		want := map[bool]string{true: "flagged", false: "cleared"}[flip%2 == 0]
		if c.Change != want || c.Rate != float64(flip) {
			t.Fatalf("change %d: %s at rate %v, want flip %d (%s)", i, c.Change, c.Rate, flip, want)
		}
	}
	if len(verdicts[1].History) != 1 || verdicts[1].History[0].Change != "flagged" {
		t.Fatalf("other firmware's history: %+v", verdicts[1].History)
	}
}

// TestSaveLearnedStale plays two replicas that analysed the same state: the
// first to save records the flip, the second finds the learned set changed
// and saves nothing, so the flip is recorded once.
func TestSaveLearnedStale(t *testing.T) {
	ctx := context.Background()
	svc, pool := newService(t)
	l := Learned{Flagged: []Verdict{{Model: "gw-100", Firmware: "1.0.3", Flag: IncompatRejectsPings, Rate: 12, Evidence: "test"}}}
	var wg sync.WaitGroup
	saved := make([]bool, 2)
	errs := make([]error, 2)
	for i := range saved {
		wg.Add(1)
		go func() {
			defer wg.Done()
			saved[i], errs[i] = svc.store.saveLearned(ctx, map[FirmwareKey]bool{}, l)
		}()
	}
	wg.Wait()
	if errs[0] != nil || errs[1] != nil || saved[0] == saved[1] {
		t.Fatalf("saved %v, errors %v; want exactly one saved", saved, errs)
	}
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM firmware_verdict_history`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("history rows: %d, %v; want 1", n, err)
	}
	// Learned from the set as it is now, the next save goes through.
	if ok, err := svc.store.saveLearned(ctx, map[FirmwareKey]bool{{"gw-100", "1.0.3"}: true}, Learned{}); err != nil || !ok {
		t.Fatalf("save from the current set: %v, %v", ok, err)
	}
}
