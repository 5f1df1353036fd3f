package fleet

import (
	"errors"
	"slices"
	"testing"
	"time"
)

// lostAt is a session of dur that was lost at t on a link.
func lostAt(t time.Time, dur time.Duration, l SessionLink) Event {
	return Event{Kind: KindDisconnect, Reason: ReasonConnectionLost, At: t, DurationMillis: dur.Milliseconds(), Model: "gw", SessionLink: l}
}

func codes(ps []Problem) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Code)
	}
	return out
}

func TestDiagnoseLinkDeviceRules(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 0, 0, 0, time.UTC)
	ap1, ap2 := "02:00:00:00:00:01", "02:00:00:00:00:02"
	good := SessionLink{RSSI: -60, Channel: 6, BSSID: ap1, FirstBSSID: ap1}
	weak := SessionLink{RSSI: -81, Channel: 6, BSSID: ap1, FirstBSSID: ap1}
	var none LinkStats
	cases := []struct {
		name string
		evs  []Event
		want []string
	}{
		{"healthy link, few drops", []Event{lostAt(t0, time.Hour, good), lostAt(t0.Add(time.Hour), time.Hour, good)}, nil},
		{"lost below the threshold", []Event{
			lostAt(t0, time.Minute, weak), lostAt(t0.Add(2*time.Minute), time.Minute, weak), lostAt(t0.Add(4*time.Minute), 2*time.Minute, weak),
			{Kind: KindDisconnect, Reason: ReasonClientDisconnect, At: t0.Add(10 * time.Minute), DurationMillis: (20 * time.Minute).Milliseconds(), SessionLink: good},
		}, []string{ProblemWeakSignal}},
		{"below the threshold but not shorter", []Event{
			lostAt(t0, time.Hour, weak), lostAt(t0.Add(2*time.Hour), time.Hour, weak), lostAt(t0.Add(4*time.Hour), time.Hour, weak),
			lostAt(t0.Add(5*time.Hour), time.Minute, good), lostAt(t0.Add(6*time.Hour), time.Minute, good),
		}, nil},
		{"clean ends below the threshold are not drops", []Event{
			{Kind: KindDisconnect, Reason: ReasonClientDisconnect, At: t0, SessionLink: weak},
			{Kind: KindDisconnect, Reason: ReasonClientDisconnect, At: t0.Add(time.Minute), SessionLink: weak},
			{Kind: KindDisconnect, Reason: ReasonClientDisconnect, At: t0.Add(2 * time.Minute), SessionLink: weak},
		}, nil},
		{"lost on a roam within the session", []Event{
			lostAt(t0, time.Minute, SessionLink{RSSI: -60, BSSID: ap2, FirstBSSID: ap1, RoamMillis: 1200}),
			lostAt(t0.Add(2*time.Minute), time.Minute, SessionLink{RSSI: -60, BSSID: ap1, FirstBSSID: ap2, RoamMillis: 800}),
			lostAt(t0.Add(4*time.Minute), time.Minute, good),
		}, []string{ProblemRoamingDrops}},
		{"came back on another access point", []Event{
			lostAt(t0, time.Minute, SessionLink{RSSI: -60, BSSID: ap1, FirstBSSID: ap1}),
			lostAt(t0.Add(2*time.Minute), time.Minute, SessionLink{RSSI: -60, BSSID: ap2, FirstBSSID: ap2}),
			lostAt(t0.Add(4*time.Minute), time.Minute, SessionLink{RSSI: -60, BSSID: ap1, FirstBSSID: ap1}),
		}, []string{ProblemRoamingDrops}},
		{"a roam long before the end is not a roaming drop", []Event{
			lostAt(t0, time.Hour, SessionLink{RSSI: -60, BSSID: ap2, FirstBSSID: ap1, RoamMillis: 20 * 60 * 1000}),
			lostAt(t0.Add(2*time.Hour), time.Hour, SessionLink{RSSI: -60, BSSID: ap2, FirstBSSID: ap2}),
			lostAt(t0.Add(4*time.Hour), time.Hour, SessionLink{RSSI: -60, BSSID: ap2, FirstBSSID: ap2}),
		}, nil},
		{"no link reports", []Event{lostAt(t0, time.Minute, SessionLink{}), lostAt(t0, time.Minute, SessionLink{}), lostAt(t0, time.Minute, SessionLink{})}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := codes(DiagnoseLink(tc.evs, none, LinkPolicy{})); !slices.Equal(got, tc.want) {
				t.Fatalf("problems %v, want %v", got, tc.want)
			}
		})
	}
}

// fleetCells is a fleet of model gw: channel 1 with two healthy access
// points, channel 11 with a healthy one and (optionally) a bad one, and
// channel 6 with two access points that lose sessions (a congested channel).
func fleetCells(badAP, congested bool) []linkCell {
	cells := []linkCell{
		{model: "gw", channel: 1, bssid: "a1", rssi: -60, lost: 1, hours: 20},
		{model: "gw", channel: 1, bssid: "a2", rssi: -60, lost: 1, hours: 20},
		{model: "gw", channel: 11, bssid: "b1", rssi: -60, lost: 1, hours: 20},
	}
	if badAP {
		cells = append(cells, linkCell{model: "gw", channel: 11, bssid: "b2", rssi: -60, lost: 30, hours: 10})
	}
	if congested {
		cells = append(cells, linkCell{model: "gw", channel: 6, bssid: "c1", rssi: -60, lost: 20, hours: 10},
			linkCell{model: "gw", channel: 6, bssid: "c2", rssi: -60, lost: 20, hours: 10})
	}
	return cells
}

func flagged(st LinkStats) (chans []int, aps []string) {
	for _, c := range st.Channels {
		if c.Congested {
			chans = append(chans, c.Channel)
		}
	}
	for _, a := range st.AccessPoints {
		if a.Bad {
			aps = append(aps, a.BSSID)
		}
	}
	return chans, aps
}

func TestJudgeLinks(t *testing.T) {
	lp := DefaultLinkPolicy()
	t.Run("healthy fleet", func(t *testing.T) {
		st := judgeLinks(fleetCells(false, false), nil, nil, 0, lp)
		if c, a := flagged(st); c != nil || a != nil || st.Dominant != "link" && st.Dominant != "none" {
			t.Fatalf("flagged channels %v access points %v dominant %s", c, a, st.Dominant)
		}
	})
	t.Run("a congested channel is not two bad access points", func(t *testing.T) {
		st := judgeLinks(fleetCells(false, true), nil, nil, 0, lp)
		c, a := flagged(st)
		if !slices.Equal(c, []int{6}) || a != nil {
			t.Fatalf("flagged channels %v access points %v, want channel 6 only", c, a)
		}
		if st.Causes["congested_channel"] != 40 || st.Dominant != "link" {
			t.Fatalf("causes %v dominant %s", st.Causes, st.Dominant)
		}
	})
	t.Run("a bad access point on a healthy channel", func(t *testing.T) {
		st := judgeLinks(fleetCells(true, false), nil, nil, 0, lp)
		c, a := flagged(st)
		if c != nil || !slices.Equal(a, []string{"b2"}) {
			t.Fatalf("flagged channels %v access points %v, want b2 only", c, a)
		}
	})
	t.Run("both", func(t *testing.T) {
		st := judgeLinks(fleetCells(true, true), nil, nil, 0, lp)
		c, a := flagged(st)
		if !slices.Equal(c, []int{6}) || !slices.Equal(a, []string{"b2"}) {
			t.Fatalf("flagged channels %v access points %v, want 6 and b2", c, a)
		}
	})
	t.Run("one access point alone is judged as an access point", func(t *testing.T) {
		cells := append(fleetCells(false, false), linkCell{model: "gw", channel: 3, bssid: "d1", rssi: -60, lost: 30, hours: 10})
		c, a := flagged(judgeLinks(cells, nil, nil, 0, lp))
		if c != nil || !slices.Equal(a, []string{"d1"}) {
			t.Fatalf("flagged channels %v access points %v, want d1 only", c, a)
		}
	})
	t.Run("weak signals and roams do not count against their access point", func(t *testing.T) {
		cells := append(fleetCells(false, false),
			linkCell{model: "gw", channel: 11, bssid: "b2", rssi: -85, lost: 30, hours: 10},
			linkCell{model: "gw", channel: 11, bssid: "b2", rssi: -60, lost: 20, roamLost: 20, hours: 10})
		st := judgeLinks(cells, nil, nil, 0, lp)
		if c, a := flagged(st); c != nil || a != nil {
			t.Fatalf("flagged channels %v access points %v, want none", c, a)
		}
		if st.Causes["weak_signal"] != 30 || st.Causes["roaming"] != 20 {
			t.Fatalf("causes %v", st.Causes)
		}
	})
	t.Run("access points are compared within a model", func(t *testing.T) {
		// Another model drops a lot everywhere; gw's access point b1 is no
		// worse than gw's others.
		cells := append(fleetCells(false, false), linkCell{model: "cam", channel: 11, bssid: "b1", rssi: -60, lost: 40, hours: 10},
			linkCell{model: "cam", channel: 1, bssid: "a1", rssi: -60, lost: 40, hours: 10})
		for _, a := range judgeLinks(cells, nil, nil, 0, lp).AccessPoints {
			if a.Bad {
				t.Fatalf("access point %s of %s flagged", a.BSSID, a.Model)
			}
		}
	})
	t.Run("live sessions count their hours", func(t *testing.T) {
		// Without live hours channel 1 would have too few device-hours
		// to dilute c's drops; with them the ratio is finite and small.
		cells := []linkCell{{model: "gw", channel: 6, bssid: "c1", rssi: -60, lost: 6, hours: 1}, {model: "gw", channel: 6, bssid: "c2", rssi: -60, lost: 6, hours: 1}}
		live := []liveLink{{model: "gw", channel: 1, bssid: "a1", hours: 0.01}}
		if c, _ := flagged(judgeLinks(cells, live, nil, 0, lp)); c != nil {
			t.Fatalf("flagged %v on 0.01 h of comparison", c)
		}
		live = []liveLink{{model: "gw", channel: 1, bssid: "a1", hours: 100}}
		if c, _ := flagged(judgeLinks(cells, live, nil, 0, lp)); !slices.Equal(c, []int{6}) {
			t.Fatalf("flagged %v, want 6 against 100 live device-hours", c)
		}
	})
	t.Run("firmware dominates", func(t *testing.T) {
		if st := judgeLinks(fleetCells(false, false), nil, nil, 50, lp); st.Dominant != "firmware" {
			t.Fatalf("dominant %s with 50 ping disconnects and no link cause", st.Dominant)
		}
	})
}

func TestDiagnoseLinkNamesFlaggedGroups(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 0, 0, 0, time.UTC)
	st := judgeLinks(fleetCells(true, true), nil, nil, 0, DefaultLinkPolicy())
	on := func(ch int, ap string) []Event {
		l := SessionLink{RSSI: -60, Channel: ch, BSSID: ap, FirstBSSID: ap}
		return []Event{lostAt(t0, time.Minute, l), lostAt(t0.Add(time.Minute), time.Minute, l)}
	}
	for _, tc := range []struct {
		evs  []Event
		want []string
	}{
		{on(6, "c1"), []string{ProblemCongestedChannel}},
		{on(11, "b2"), []string{ProblemBadAccessPoint}},
		{on(1, "a1"), nil},
		{on(11, "b1"), nil},
	} {
		if got := codes(DiagnoseLink(tc.evs, st, LinkPolicy{})); !slices.Equal(got, tc.want) {
			t.Errorf("device on %d/%s: %v, want %v", tc.evs[0].Channel, tc.evs[0].BSSID, got, tc.want)
		}
	}
}

func TestLinkPolicyValidation(t *testing.T) {
	for _, tc := range []struct {
		l     LinkPolicy
		field string
	}{
		{LinkPolicy{WeakRSSIdBm: -10}, "link.weak_rssi_dbm"},
		{LinkPolicy{WeakShare: 2}, "link.weak_share"},
		{LinkPolicy{ChannelRatio: 0.5}, "link.channel_ratio"},
		{LinkPolicy{WindowSeconds: -1}, "link.window_seconds"},
	} {
		_, err := Policy{Link: tc.l}.compile()
		if err == nil || !containsField(err, tc.field) {
			t.Errorf("%+v: error %v, want one naming %s", tc.l, err, tc.field)
		}
	}
	if _, err := (Policy{Link: DefaultLinkPolicy()}).compile(); err != nil {
		t.Fatalf("default link policy refused: %v", err)
	}
}

func containsField(err error, field string) bool {
	var v *ValidationError
	return errors.As(err, &v) && v.Field == field
}
