package firmware

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func mustZone(t *testing.T, name string) *time.Location {
	t.Helper()
	loc, err := LoadZone(name)
	if err != nil {
		t.Fatal(err)
	}
	return loc
}

// nightly is 02:00–04:00 every day.
var nightly = []Window{{Cron: "0 2 * * *", Duration: Duration(2 * time.Hour)}}

func TestWindowsAt(t *testing.T) {
	paris := mustZone(t, "Europe/Paris")
	at := func(s string) time.Time { // a UTC instant
		v, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return v.UTC()
	}
	tests := []struct {
		name string
		ws   []Window
		loc  *time.Location
		t    time.Time
		want WindowState
	}{
		{name: "no windows: always open", loc: time.UTC, t: at("2026-06-01T12:00:00Z"), want: WindowState{Open: true}},
		{name: "before the opening", ws: nightly, loc: time.UTC, t: at("2026-06-01T01:59:59Z"),
			want: WindowState{NextOpen: at("2026-06-01T02:00:00Z")}},
		{name: "at the opening", ws: nightly, loc: time.UTC, t: at("2026-06-01T02:00:00Z"),
			want: WindowState{Open: true, OpenedAt: at("2026-06-01T02:00:00Z"), ClosesAt: at("2026-06-01T04:00:00Z")}},
		{name: "inside", ws: nightly, loc: time.UTC, t: at("2026-06-01T03:59:59.9Z"),
			want: WindowState{Open: true, OpenedAt: at("2026-06-01T02:00:00Z"), ClosesAt: at("2026-06-01T04:00:00Z")}},
		{name: "at the close", ws: nightly, loc: time.UTC, t: at("2026-06-01T04:00:00Z"),
			want: WindowState{NextOpen: at("2026-06-02T02:00:00Z")}},
		// 02:00 in Paris is 00:00 UTC in summer (CEST) and 01:00 in winter (CET).
		{name: "in the zone, summer", ws: nightly, loc: paris, t: at("2026-06-01T00:30:00Z"),
			want: WindowState{Open: true, OpenedAt: at("2026-06-01T00:00:00Z"), ClosesAt: at("2026-06-01T02:00:00Z")}},
		{name: "in the zone, winter", ws: nightly, loc: paris, t: at("2026-01-15T00:30:00Z"),
			want: WindowState{NextOpen: at("2026-01-15T01:00:00Z")}},
		{name: "UTC's window is not Paris's", ws: nightly, loc: paris, t: at("2026-06-01T02:30:00Z"),
			want: WindowState{NextOpen: at("2026-06-02T00:00:00Z")}},
		{name: "weekdays only: Saturday waits for Monday", ws: []Window{{Cron: "0 2 * * 1-5", Duration: Duration(time.Hour)}}, loc: time.UTC,
			t: at("2026-06-06T02:30:00Z"), want: WindowState{NextOpen: at("2026-06-08T02:00:00Z")}},
		{name: "two windows: the next of either", ws: append([]Window{{Cron: "30 13 * * *", Duration: Duration(time.Hour)}}, nightly...), loc: time.UTC,
			t: at("2026-06-01T12:00:00Z"), want: WindowState{NextOpen: at("2026-06-01T13:30:00Z")}},
		{name: "two overlapping windows: open from the first opening to the last close",
			ws: append([]Window{{Cron: "0 3 * * *", Duration: Duration(2 * time.Hour)}}, nightly...), loc: time.UTC,
			t:    at("2026-06-01T03:30:00Z"),
			want: WindowState{Open: true, OpenedAt: at("2026-06-01T02:00:00Z"), ClosesAt: at("2026-06-01T05:00:00Z")}},
		{name: "a descriptor", ws: []Window{{Cron: "@daily", Duration: Duration(time.Hour)}}, loc: time.UTC, t: at("2026-06-01T00:10:00Z"),
			want: WindowState{Open: true, OpenedAt: at("2026-06-01T00:00:00Z"), ClosesAt: at("2026-06-01T01:00:00Z")}},
		{name: "a window that does not parse is never open", ws: []Window{{Cron: "not cron", Duration: Duration(time.Hour)}}, loc: time.UTC,
			t: at("2026-06-01T00:10:00Z"), want: WindowState{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := WindowsAt(tt.ws, tt.loc, tt.t)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("WindowsAt mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestCampaignValidateWindows(t *testing.T) {
	tests := []struct {
		name, field, msg string // field "" = valid
		edit             func(*Campaign)
	}{
		{name: "nightly", edit: func(c *Campaign) { c.Windows = nightly }},
		{name: "in a zone, with a tag", edit: func(c *Campaign) { c.Windows, c.Timezone, c.TimezoneTag = nightly, "Europe/Paris", "tz" }},
		{name: "as long as the period", edit: func(c *Campaign) { c.Windows = []Window{{Cron: "0 * * * *", Duration: Duration(time.Hour)}} }},
		{name: "weekdays, 23 hours", edit: func(c *Campaign) {
			c.Windows = []Window{{Cron: "0 1 * * 1-5", Duration: Duration(23 * time.Hour)}}
		}},
		{name: "every minute, for 30 s", edit: func(c *Campaign) { c.Windows = []Window{{Cron: "* * * * *", Duration: Duration(30 * time.Second)}} }},

		{name: "bad cron", field: "windows[0].cron", msg: "not a cron expression",
			edit: func(c *Campaign) { c.Windows = []Window{{Cron: "0 25 * * *", Duration: Duration(time.Hour)}} }},
		{name: "empty cron", field: "windows[0].cron", msg: "required",
			edit: func(c *Campaign) { c.Windows = []Window{{Duration: Duration(time.Hour)}} }},
		{name: "zone in the cron", field: "windows[0].cron", msg: "timezone",
			edit: func(c *Campaign) {
				c.Windows = []Window{{Cron: "CRON_TZ=Asia/Tokyo 0 2 * * *", Duration: Duration(time.Hour)}}
			}},
		{name: "@every", field: "windows[0].cron", msg: "@every",
			edit: func(c *Campaign) { c.Windows = []Window{{Cron: "@every 1h", Duration: Duration(time.Minute)}} }},
		{name: "never opens", field: "windows[1].cron", msg: "never opens",
			edit: func(c *Campaign) {
				c.Windows = append(nightly, Window{Cron: "0 0 30 2 *", Duration: Duration(time.Hour)})
			}},
		{name: "zero duration", field: "windows[0].duration", msg: "> 0",
			edit: func(c *Campaign) { c.Windows = []Window{{Cron: "0 2 * * *"}} }},
		{name: "negative duration", field: "windows[0].duration", msg: "> 0",
			edit: func(c *Campaign) { c.Windows = []Window{{Cron: "0 2 * * *", Duration: Duration(-time.Hour)}} }},
		{name: "longer than the period", field: "windows[0].duration", msg: "longer than the 1h0m0s between two openings",
			edit: func(c *Campaign) { c.Windows = []Window{{Cron: "0 * * * *", Duration: Duration(61 * time.Minute)}} }},
		{name: "longer than the shortest gap of an irregular schedule", field: "windows[0].duration", msg: "longer than the 10m0s",
			edit: func(c *Campaign) { c.Windows = []Window{{Cron: "0,50 * * * *", Duration: Duration(11 * time.Minute)}} }},
		{name: "weekdays, 25 hours", field: "windows[0].duration", msg: "24h0m0s",
			edit: func(c *Campaign) { c.Windows = []Window{{Cron: "0 1 * * 1-5", Duration: Duration(25 * time.Hour)}} }},
		{name: "unknown zone", field: "timezone", msg: "not an IANA time zone",
			edit: func(c *Campaign) { c.Windows, c.Timezone = nightly, "Mars/Olympus" }},
		{name: "the machine's zone", field: "timezone", msg: "Local",
			edit: func(c *Campaign) { c.Windows, c.Timezone = nightly, "Local" }},
		{name: "a zone without windows", field: "timezone", msg: "has none",
			edit: func(c *Campaign) { c.Timezone = "Europe/Paris" }},
		{name: "a zone tag without windows", field: "timezone_tag", msg: "has none",
			edit: func(c *Campaign) { c.TimezoneTag = "tz" }},
		{name: "a zone tag that is no tag key", field: "timezone_tag", msg: "tag key",
			edit: func(c *Campaign) { c.Windows, c.TimezoneTag = nightly, "tz=Europe/Paris" }},
		{name: "too many windows", field: "windows", msg: "more than 16",
			edit: func(c *Campaign) {
				for range 17 {
					c.Windows = append(c.Windows, nightly[0])
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testCampaign()
			tt.edit(&c)
			err := c.Validate()
			var ve *ValidationError
			switch {
			case tt.field == "" && err != nil:
				t.Fatalf("want valid, got %v", err)
			case tt.field == "":
			case !errors.As(err, &ve) || ve.Field != tt.field:
				t.Fatalf("got %v, want a ValidationError on %s", err, tt.field)
			case !strings.Contains(ve.Msg, tt.msg):
				t.Fatalf("message %q does not say %q", ve.Msg, tt.msg)
			}
		})
	}
}

// windowed is testCampaign with nightly windows in Paris and per-device
// zones from the tag tz. testNow (03:04:05 UTC on 2 January) is 04:04 in
// Paris (CET): outside, the next window opens at 01:00 UTC on 3 January;
// in New York (EST) it is 22:04, and in Tokyo (JST) 12:04.
func windowed(c *Campaign) {
	c.Windows = nightly
	c.Timezone, c.TimezoneTag = "Europe/Paris", "tz"
	c.Stage = 3 // 100 devices, the last stage: 95 to go
	c.Pacing = Pacing{}
}

// TestCampaignNextWindows: a campaign with windows dispatches only the
// pending devices whose zone is inside a window, waits with the next
// opening when none is, and restarts its pacing schedule at the opening.
func TestCampaignNextWindows(t *testing.T) {
	runNextCases(t, []nextCase{
		{
			name:   "outside every window: waits for the next",
			edit:   windowed,
			stats:  StageStats{Targets: 95, Pending: 95, PendingByZone: []ZonePending{{Tag: "", Pending: 95}}},
			want:   Decision{Action: ActionWait},
			reason: []string{"95 pending outside its maintenance windows", "next opens at 2026-01-03T01:00:00Z"},
		},
		{
			name:   "a device whose zone is in a window while the campaign's is not",
			edit:   windowed,
			stats:  StageStats{Targets: 95, Pending: 95, PendingByZone: []ZonePending{{Tag: "", Pending: 90}, {Tag: "Asia/Tokyo", Pending: 5}}},
			want:   Decision{Action: ActionWait},
			reason: []string{"outside", "next opens at 2026-01-02T17:00:00Z"},
		},
		{
			name: "Tokyo's window open, Paris's closed: only Tokyo's devices go",
			edit: func(c *Campaign) {
				windowed(c)
				c.Windows = []Window{{Cron: "0 11 * * *", Duration: Duration(2 * time.Hour)}}
			},
			stats: StageStats{Targets: 95, Pending: 95, PendingByZone: []ZonePending{
				{Tag: "", Pending: 80}, {Tag: "Asia/Tokyo", Pending: 5}, {Tag: "America/New_York", Pending: 10}}},
			want:   Decision{Action: ActionDispatch, Dispatch: 5, Zones: []string{"Asia/Tokyo"}},
			reason: []string{"dispatching 5 jobs of 95 pending, 5 inside an open maintenance window"},
		},
		{
			name: "the reverse: Paris's window open, the devices tagged New York wait",
			edit: func(c *Campaign) {
				windowed(c)
				c.Windows = []Window{{Cron: "0 4 * * *", Duration: Duration(time.Hour)}}
			},
			stats: StageStats{Targets: 95, Pending: 95, PendingByZone: []ZonePending{
				{Tag: "", Pending: 80}, {Tag: "America/New_York", Pending: 10}, {Tag: "Europe/Paris", Pending: 5}}},
			want: Decision{Action: ActionDispatch, Dispatch: 85, Zones: []string{"", "Europe/Paris"}},
		},
		{
			name: "a tag that names no zone falls back to the campaign's",
			edit: func(c *Campaign) {
				windowed(c)
				c.Windows = []Window{{Cron: "0 4 * * *", Duration: Duration(time.Hour)}}
			},
			stats: StageStats{Targets: 95, Pending: 95, PendingByZone: []ZonePending{
				{Tag: "Mars/Olympus", Pending: 3}, {Tag: "Local", Pending: 2}, {Tag: "Asia/Tokyo", Pending: 90}}},
			want: Decision{Action: ActionDispatch, Dispatch: 5, Zones: []string{"Mars/Olympus", "Local"}},
		},
		{
			name: "without a timezone tag every device is in the campaign's zone",
			edit: func(c *Campaign) {
				windowed(c)
				c.TimezoneTag = ""
				c.Windows = []Window{{Cron: "0 4 * * *", Duration: Duration(time.Hour)}}
			},
			stats: StageStats{Targets: 95, Pending: 95, PendingByZone: []ZonePending{{Tag: "", Pending: 95}}},
			want:  Decision{Action: ActionDispatch, Dispatch: 95, Zones: []string{""}},
		},
		{
			name: "outside the windows, gates are still judged",
			edit: windowed,
			stats: StageStats{Targets: 95, Pending: 40, Failed: 10, Succeeded: 45,
				PendingByZone: []ZonePending{{Tag: "", Pending: 40}}},
			want: Decision{Action: ActionPause, Gate: &GateResult{Gate: GateFailureRate, Breached: true, Value: 10.0 / 95, Threshold: 0.05,
				Detail: "10 of 95 devices failed (10.526316%) > 5%"}},
		},
		{
			name:   "outside the windows, the soak goes on",
			edit:   func(c *Campaign) { windowed(c); c.StageDoneAt = timePtr(testNow.Add(-2 * time.Hour)) },
			stats:  StageStats{Targets: 95, Succeeded: 95},
			want:   Decision{Action: ActionComplete, Gate: &GateResult{Gate: GateFailureRate, Threshold: 0.05, Detail: "0 of 95 devices failed (0%) <= 5%"}},
			reason: []string{"campaign complete"},
		},
		{
			name:  "a rollback is not held by windows",
			edit:  func(c *Campaign) { windowed(c); c.State = StateRollingBack },
			stats: StageStats{Targets: 5, Pending: 5},
			want:  Decision{Action: ActionDispatch, Dispatch: 5},
		},
	})
}

// TestCampaignNextApproval: a stage that requires approval waits for it
// once the stage before it has passed, gates still judged, and dispatches
// once approved.
func TestCampaignNextApproval(t *testing.T) {
	needs := func(stage, approved int) func(*Campaign) {
		return func(c *Campaign) {
			c.Stages[stage].RequiresApproval = true
			c.Stage, c.Approved = stage, approved
		}
	}
	runNextCases(t, []nextCase{
		{
			name:   "a stage that requires approval waits for it before dispatching",
			edit:   needs(1, 1),
			stats:  StageStats{Targets: 5, Pending: 5},
			want:   Decision{Action: ActionAwaitApproval},
			reason: []string{`stage 2 "10%" requires an operator's approval`},
		},
		{
			name:  "a first stage that requires approval waits after start",
			edit:  needs(0, 0),
			stats: StageStats{Targets: 5, Pending: 5},
			want:  Decision{Action: ActionAwaitApproval},
		},
		{
			name:   "awaiting approval waits",
			edit:   func(c *Campaign) { needs(1, 1)(c); c.State = StateAwaitingApproval },
			stats:  StageStats{Targets: 5, Pending: 5},
			want:   Decision{Action: ActionWait},
			reason: []string{"waits for an operator's approval"},
		},
		{
			name: "awaiting approval, the gates are still judged",
			edit: func(c *Campaign) {
				needs(1, 1)(c)
				c.State = StateAwaitingApproval
				c.Stages[1].ConnectivityRatio = 2
			},
			stats: StageStats{Targets: 5, Pending: 5, UpgradedDisconnectsPerHour: 30, FleetDisconnectsPerHour: 1, UpgradedDeviceHours: 1},
			want: Decision{Action: ActionPause, Gate: &GateResult{Gate: GateConnectivity, Breached: true, Value: 30, Threshold: 2,
				Detail: "upgraded devices disconnect 30/device-hour over 1 device-hours > 2 × max(fleet 1, 1) = 2"}},
		},
		{
			name:  "approved: dispatches",
			edit:  needs(1, 2),
			stats: StageStats{Targets: 5, Pending: 5},
			want:  Decision{Action: ActionDispatch, Dispatch: 5},
		},
		{
			name:  "an approval of an earlier stage does not approve a later one",
			edit:  func(c *Campaign) { needs(1, 2)(c); c.Stages[2].RequiresApproval = true; c.Stage = 2 },
			stats: StageStats{Targets: 5, Pending: 5},
			want:  Decision{Action: ActionAwaitApproval},
		},
		{
			// The stage before it still soaks: Next advances only after the
			// soak and its gates, and only then is approval asked.
			name: "the previous stage's soak comes first",
			edit: func(c *Campaign) {
				c.Stages[1].RequiresApproval = true
				c.StageDoneAt = timePtr(testNow.Add(-time.Minute))
			},
			stats: StageStats{Targets: 5, Succeeded: 5},
			want:  Decision{Action: ActionWait},
		},
	})
}

// TestWindowRestartsPacing: entering a window does not send the backlog of
// the time outside it, nor PacingCatchUp's worth of it: the pacing schedule
// restarts at the opening, as a resume does.
func TestWindowRestartsPacing(t *testing.T) {
	c := testCampaign()
	windowed(&c)
	c.Windows = []Window{{Cron: "4 4 * * *", Duration: Duration(time.Hour)}} // 04:04 in Paris, 03:04:00 UTC
	c.Pacing = Pacing{DevicesPerMinute: 60}
	c.PacedUntil = time.Date(2026, 1, 1, 4, 0, 0, 0, time.UTC) // the end of yesterday's window
	stats := StageStats{Targets: 95, Pending: 95, PendingByZone: []ZonePending{{Tag: "", Pending: 95}}}
	opened := time.Date(2026, 1, 2, 3, 4, 0, 0, time.UTC)
	for _, tt := range []struct {
		after time.Duration
		n     int
	}{{500 * time.Millisecond, 1}, {2500 * time.Millisecond, 3}, {10 * time.Second, 6}} {
		d := c.Next(stats, opened.Add(tt.after))
		if d.Action != ActionDispatch || d.Dispatch != tt.n {
			t.Errorf("%s after the opening: %s %d (%s), want %d jobs", tt.after, d.Action, d.Dispatch, d.Reason, tt.n)
		}
	}
	if d := c.Next(stats, opened.Add(-time.Second)); d.Action != ActionWait {
		t.Errorf("a second before the opening: %s (%s), want wait", d.Action, d.Reason)
	}
}
