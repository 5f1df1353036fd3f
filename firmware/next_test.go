package firmware

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

var testNow = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func timePtr(t time.Time) *time.Time { return &t }

// testCampaign is a running campaign at its canary stage: canary 5, then
// 10 %, 50 % and 100 % of 100 devices.
func testCampaign() Campaign {
	return Campaign{
		ID:         "cmp-1",
		Name:       "gw 1.4.0",
		FirmwareID: "fw-1",
		Version:    "1.4.0",
		Stages: []Stage{
			{Name: "canary", Count: 5, Soak: Duration(time.Hour), MaxFailureRate: 0.2, MaxNotBackOnline: 0, ConnectivityRatio: 2},
			{Name: "10%", Percent: 10, Soak: Duration(30 * time.Minute), MaxFailureRate: 0.1, MaxNotBackOnline: 1},
			{Name: "50%", Percent: 50, Soak: Duration(30 * time.Minute), MaxFailureRate: 0.1, MaxNotBackOnline: -1},
			{Name: "all", Percent: 100, Soak: Duration(time.Hour), MaxFailureRate: 0.05, MaxNotBackOnline: -1},
		},
		DeviceTimeout: Duration(15 * time.Minute),
		State:         StateRunning,
		Total:         100,
	}
}

// nextCase is one row of Next's tables: a campaign (testCampaign edited),
// what the dispatcher counted, and the decision Next must take.
type nextCase struct {
	name   string
	edit   func(*Campaign)
	stats  StageStats
	want   Decision
	reason []string // substrings Reason must contain
	not    []string // substrings Reason must not contain
}

var passingCanary = &GateResult{Gate: GateFailureRate, Value: 0, Threshold: 0.2, Detail: "0 of 5 devices failed (0%) <= 20%"}

func runNextCases(t *testing.T, tests []nextCase) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testCampaign()
			if tt.edit != nil {
				tt.edit(&c)
			}
			got := c.Next(tt.stats, testNow)
			if diff := cmp.Diff(tt.want, got, cmpopts.IgnoreFields(Decision{}, "Reason"), cmpopts.EquateApprox(0, 1e-9)); diff != "" {
				t.Errorf("Next mismatch (-want +got):\n%s\nreason: %s", diff, got.Reason)
			}
			if got.Reason == "" {
				t.Errorf("Next gave an empty reason")
			}
			for _, sub := range tt.reason {
				if !strings.Contains(got.Reason, sub) {
					t.Errorf("reason %q does not contain %q", got.Reason, sub)
				}
			}
			for _, sub := range tt.not {
				if strings.Contains(got.Reason, sub) {
					t.Errorf("reason %q contains %q", got.Reason, sub)
				}
			}
			// Next is pure: the same inputs give the same decision.
			if again := c.Next(tt.stats, testNow); !cmp.Equal(got, again) {
				t.Errorf("second call differs: %+v vs %+v", got, again)
			}
		})
	}
}

// TestCampaignNext covers the states that do not act, dispatch and pacing,
// and the end of a stage; TestCampaignNextGates the health gates.
func TestCampaignNext(t *testing.T) {
	runNextCases(t, []nextCase{
		// States that do not act.
		{
			name:   "draft waits",
			edit:   func(c *Campaign) { c.State = StateDraft },
			stats:  StageStats{Targets: 5, Pending: 5},
			want:   Decision{Action: ActionWait},
			reason: []string{"draft"},
		},
		{
			name:   "paused waits",
			edit:   func(c *Campaign) { c.State = StatePaused },
			stats:  StageStats{Targets: 5, Pending: 5},
			want:   Decision{Action: ActionWait},
			reason: []string{"campaign is paused"},
		},
		{
			name:   "aborted waits",
			edit:   func(c *Campaign) { c.State = StateAborted },
			stats:  StageStats{Targets: 5, Pending: 5},
			want:   Decision{Action: ActionWait},
			reason: []string{"campaign is aborted"},
		},
		{
			name:   "completed waits",
			edit:   func(c *Campaign) { c.State = StateCompleted },
			stats:  StageStats{Targets: 5, Succeeded: 5},
			want:   Decision{Action: ActionWait},
			reason: []string{"campaign is completed"},
		},
		{
			name:   "rolled back waits",
			edit:   func(c *Campaign) { c.State = StateRolledBack },
			stats:  StageStats{Targets: 5, Pending: 5},
			want:   Decision{Action: ActionWait},
			reason: []string{"campaign is rolled_back"},
		},
		{
			name:   "unknown state waits",
			edit:   func(c *Campaign) { c.State = "exploded" },
			stats:  StageStats{Targets: 5, Pending: 5},
			want:   Decision{Action: ActionWait},
			reason: []string{`"exploded"`},
		},
		{
			name:   "stage index out of range pauses",
			edit:   func(c *Campaign) { c.Stage = 4 },
			stats:  StageStats{Targets: 5, Pending: 5},
			want:   Decision{Action: ActionPause},
			reason: []string{"stage index 4", "4 stages"},
		},

		// Dispatch and pacing.
		{
			name:   "dispatch every pending job without pacing",
			stats:  StageStats{Targets: 5, Pending: 5},
			want:   Decision{Action: ActionDispatch, Dispatch: 5},
			reason: []string{`stage 1 "canary"`, "dispatching 5 jobs of 5 pending"},
		},
		{
			name:   "max_concurrent caps dispatch",
			edit:   func(c *Campaign) { c.Stage = 2; c.Pacing = Pacing{MaxConcurrent: 3} },
			stats:  StageStats{Targets: 40, Pending: 30, InFlight: 1, Succeeded: 9},
			want:   Decision{Action: ActionDispatch, Dispatch: 2},
			reason: []string{"dispatching 2 jobs of 30 pending", "1 in flight of max_concurrent 3"},
		},
		{
			name: "devices_per_minute sends the jobs due by now",
			edit: func(c *Campaign) {
				c.Stage = 2
				c.Pacing = Pacing{DevicesPerMinute: 600}
				c.PacedUntil = testNow.Add(-500 * time.Millisecond)
			},
			stats:  StageStats{Targets: 40, Pending: 30, InFlight: 7, Succeeded: 3},
			want:   Decision{Action: ActionDispatch, Dispatch: 6, PacedUntil: testNow.Add(100 * time.Millisecond)},
			reason: []string{"dispatching 6 jobs of 30 pending", "devices_per_minute 600, 6 jobs due now"},
		},
		{
			name:   "a campaign without a schedule yet sends one job",
			edit:   func(c *Campaign) { c.Stage = 2; c.Pacing = Pacing{DevicesPerMinute: 600} },
			stats:  StageStats{Targets: 400, Pending: 300},
			want:   Decision{Action: ActionDispatch, Dispatch: 1, PacedUntil: testNow.Add(100 * time.Millisecond)},
			reason: []string{"dispatching 1 job of 300 pending", "1 job due now"},
		},
		{
			name: "a schedule ahead of the clock waits",
			edit: func(c *Campaign) {
				c.Stage = 2
				c.Pacing = Pacing{DevicesPerMinute: 600}
				c.PacedUntil = testNow.Add(50 * time.Millisecond)
			},
			stats:  StageStats{Targets: 400, Pending: 290, InFlight: 10},
			want:   Decision{Action: ActionWait},
			reason: []string{"pacing", "devices_per_minute 600, next job due at 03:04:05.050", "290 pending"},
		},
		{
			name: "a lag up to the catch-up window is made up in one batch",
			edit: func(c *Campaign) {
				c.Stage = 2
				c.Pacing = Pacing{DevicesPerMinute: 600}
				c.PacedUntil = testNow.Add(-1500 * time.Millisecond)
			},
			stats: StageStats{Targets: 400, Pending: 300},
			want:  Decision{Action: ActionDispatch, Dispatch: 16, PacedUntil: testNow.Add(100 * time.Millisecond)},
		},
		{
			name: "an older lag is forgiven, not sent as a burst",
			edit: func(c *Campaign) {
				c.Stage = 2
				c.Pacing = Pacing{DevicesPerMinute: 600}
				c.PacedUntil = testNow.Add(-time.Hour)
			},
			stats:  StageStats{Targets: 400, Pending: 300},
			want:   Decision{Action: ActionDispatch, Dispatch: 51, PacedUntil: testNow.Add(100 * time.Millisecond)},
			reason: []string{"51 jobs due now"},
		},
		{
			name: "a slow rate sends one job per interval",
			edit: func(c *Campaign) {
				c.Stage = 2
				c.Pacing = Pacing{DevicesPerMinute: 10}
				c.PacedUntil = testNow.Add(-time.Second)
			},
			stats: StageStats{Targets: 40, Pending: 30},
			want:  Decision{Action: ActionDispatch, Dispatch: 1, PacedUntil: testNow.Add(5 * time.Second)},
		},
		{
			name: "both caps, concurrency is tighter",
			edit: func(c *Campaign) {
				c.Stage = 2
				c.Pacing = Pacing{DevicesPerMinute: 600, MaxConcurrent: 5}
				c.PacedUntil = testNow.Add(-time.Second)
			},
			stats:  StageStats{Targets: 40, Pending: 30, InFlight: 3, Succeeded: 7},
			want:   Decision{Action: ActionDispatch, Dispatch: 2, PacedUntil: testNow.Add(-800 * time.Millisecond)},
			reason: []string{"dispatching 2 jobs", "max_concurrent 5"},
			not:    []string{"devices_per_minute"},
		},
		{
			name: "both caps, rate is tighter",
			edit: func(c *Campaign) {
				c.Stage = 2
				c.Pacing = Pacing{DevicesPerMinute: 600, MaxConcurrent: 20}
				c.PacedUntil = testNow.Add(-300 * time.Millisecond)
			},
			stats:  StageStats{Targets: 40, Pending: 30, InFlight: 3, Succeeded: 7},
			want:   Decision{Action: ActionDispatch, Dispatch: 4, PacedUntil: testNow.Add(100 * time.Millisecond)},
			reason: []string{"dispatching 4 jobs", "devices_per_minute 600"},
			not:    []string{"max_concurrent"},
		},
		{
			name: "caps above pending dispatch every pending job",
			edit: func(c *Campaign) {
				c.Pacing = Pacing{DevicesPerMinute: 6000, MaxConcurrent: 100}
				c.PacedUntil = testNow.Add(-time.Second)
			},
			stats: StageStats{Targets: 5, Pending: 5},
			want:  Decision{Action: ActionDispatch, Dispatch: 5, PacedUntil: testNow.Add(-950 * time.Millisecond)},
			not:   []string{"pacing"},
		},
		{
			name:   "max_concurrent reached waits",
			edit:   func(c *Campaign) { c.Stage = 2; c.Pacing = Pacing{MaxConcurrent: 3} },
			stats:  StageStats{Targets: 40, Pending: 30, InFlight: 3, Succeeded: 7},
			want:   Decision{Action: ActionWait},
			reason: []string{"pacing", "3 in flight of max_concurrent 3", "30 pending"},
		},
		{
			name:   "nothing pending, devices in flight waits",
			stats:  StageStats{Targets: 5, InFlight: 2, Succeeded: 3},
			want:   Decision{Action: ActionWait},
			reason: []string{`stage 1 "canary"`, "waiting for 2 devices"},
		},

		// End of a stage: soak, advance, complete.
		{
			name:   "every device finished starts the soak",
			stats:  StageStats{Targets: 5, Succeeded: 5},
			want:   Decision{Action: ActionSoak},
			reason: []string{"5 succeeded", "soaking for 1h0m0s until 2026-01-02T04:04:05Z"},
		},
		{
			name:   "soaking waits",
			edit:   func(c *Campaign) { c.StageDoneAt = timePtr(testNow.Add(-30 * time.Minute)) },
			stats:  StageStats{Targets: 5, Succeeded: 5},
			want:   Decision{Action: ActionWait},
			reason: []string{"soaking until 2026-01-02T03:34:05Z"},
		},
		{
			name:   "soak over advances with the passing numbers",
			edit:   func(c *Campaign) { c.StageDoneAt = timePtr(testNow.Add(-time.Hour)) },
			stats:  StageStats{Targets: 5, Succeeded: 5, UpgradedDisconnectsPerHour: 0.5, FleetDisconnectsPerHour: 0.2, UpgradedDeviceHours: 5},
			want:   Decision{Action: ActionAdvance, Gate: passingCanary},
			reason: []string{`stage 1 "canary" passed`, "0 of 5 devices failed (0%) <= 20%", "0 devices not back online <= 0", "0.5/device-hour", `advancing to stage 2 "10%"`},
		},
		{
			name:  "soak over with failures under the limit advances",
			edit:  func(c *Campaign) { c.Stage = 1; c.StageDoneAt = timePtr(testNow.Add(-31 * time.Minute)) },
			stats: StageStats{Targets: 10, Succeeded: 9, TimedOut: 1, NotBackOnline: 1},
			want: Decision{Action: ActionAdvance, Gate: &GateResult{
				Gate: GateFailureRate, Value: 0.1, Threshold: 0.1, Detail: "1 of 10 devices failed (10%) <= 10%",
			}},
			reason: []string{"1 device not back online <= 1", "connectivity off", `advancing to stage 3 "50%"`},
		},
		{
			name:  "last stage soak over completes",
			edit:  func(c *Campaign) { c.Stage = 3; c.StageDoneAt = timePtr(testNow.Add(-2 * time.Hour)) },
			stats: StageStats{Targets: 50, Succeeded: 49, Failed: 1},
			want: Decision{Action: ActionComplete, Gate: &GateResult{
				Gate: GateFailureRate, Value: 0.02, Threshold: 0.05, Detail: "1 of 50 devices failed (2%) <= 5%",
			}},
			reason: []string{`stage 4 "all" passed`, "campaign complete"},
		},
		{
			name:   "no soak advances at once",
			edit:   func(c *Campaign) { c.Stages[0].Soak = 0 },
			stats:  StageStats{Targets: 5, Succeeded: 5},
			want:   Decision{Action: ActionAdvance, Gate: passingCanary},
			reason: []string{`advancing to stage 2 "10%"`},
		},
		{
			name:  "empty stage advances without soak",
			edit:  func(c *Campaign) { c.Stage = 1; c.Total = 3 },
			stats: StageStats{},
			want: Decision{Action: ActionAdvance, Gate: &GateResult{
				Gate: GateFailureRate, Threshold: 0.1, Detail: "0 of 0 devices failed (0%) <= 10%",
			}},
			reason: []string{`stage 2 "10%" has no devices`, `advancing to stage 3 "50%"`},
		},
		{
			name:  "empty last stage completes without soak",
			edit:  func(c *Campaign) { c.Stage = 3; c.Total = 3 },
			stats: StageStats{},
			want: Decision{Action: ActionComplete, Gate: &GateResult{
				Gate: GateFailureRate, Threshold: 0.05, Detail: "0 of 0 devices failed (0%) <= 5%",
			}},
			reason: []string{"no devices", "campaign complete"},
		},
	})
}

// A campaign that follows the fleet runs on in its last stage where another
// would complete; its joiners are dispatched and gated like the stage's
// other devices.
func TestNextFollow(t *testing.T) {
	follow := func(edit func(*Campaign)) func(*Campaign) {
		return func(c *Campaign) {
			c.Follow, c.Stage = true, 3
			if edit != nil {
				edit(c)
			}
		}
	}
	passingAll := &GateResult{Gate: GateFailureRate, Value: 0.02, Threshold: 0.05, Detail: "1 of 50 devices failed (2%) <= 5%"}
	runNextCases(t, []nextCase{
		{
			name:   "last stage soak over follows instead of completing",
			edit:   follow(func(c *Campaign) { c.StageDoneAt = timePtr(testNow.Add(-2 * time.Hour)) }),
			stats:  StageStats{Targets: 50, Succeeded: 49, Failed: 1},
			want:   Decision{Action: ActionFollow, Gate: passingAll},
			reason: []string{`stage 4 "all" passed`, "following the fleet"},
			not:    []string{"campaign complete"},
		},
		{
			name:   "empty last stage of a campaign that started with no device follows",
			edit:   follow(func(c *Campaign) { c.Total = 0 }),
			stats:  StageStats{},
			want:   Decision{Action: ActionFollow, Gate: &GateResult{Gate: GateFailureRate, Threshold: 0.05, Detail: "0 of 0 devices failed (0%) <= 5%"}},
			reason: []string{"no devices", "following the fleet"},
		},
		{
			name: "following with every device finished waits",
			edit: follow(func(c *Campaign) {
				c.StageDoneAt, c.FollowingSince = timePtr(testNow.Add(-3*time.Hour)), timePtr(testNow.Add(-2*time.Hour))
			}),
			stats:  StageStats{Targets: 50, Succeeded: 49, Failed: 1},
			want:   Decision{Action: ActionWait},
			reason: []string{"following the fleet since 2026-01-02T01:04:05Z", "49 succeeded, 1 failed"},
		},
		{
			name: "following dispatches joiners",
			edit: follow(func(c *Campaign) {
				c.StageDoneAt, c.FollowingSince = timePtr(testNow.Add(-3*time.Hour)), timePtr(testNow.Add(-2*time.Hour))
			}),
			stats:  StageStats{Targets: 52, Succeeded: 50, Pending: 2},
			want:   Decision{Action: ActionDispatch, Dispatch: 2},
			reason: []string{"dispatching 2 jobs of 2 pending"},
		},
		{
			name: "following waits for joiners in flight",
			edit: follow(func(c *Campaign) {
				c.StageDoneAt, c.FollowingSince = timePtr(testNow.Add(-3*time.Hour)), timePtr(testNow.Add(-2*time.Hour))
			}),
			stats:  StageStats{Targets: 52, Succeeded: 50, InFlight: 2},
			want:   Decision{Action: ActionWait},
			reason: []string{"waiting for 2 devices to finish"},
		},
		{
			// 3 of 52 failed > 5 % × 52 = 2.6: the joiner's failure breaches.
			name: "a failed joiner moves the last stage's failure rate over its gate",
			edit: follow(func(c *Campaign) {
				c.StageDoneAt, c.FollowingSince = timePtr(testNow.Add(-3*time.Hour)), timePtr(testNow.Add(-2*time.Hour))
			}),
			stats: StageStats{Targets: 52, Succeeded: 49, Failed: 3},
			want: Decision{Action: ActionPause, Gate: &GateResult{Gate: GateFailureRate, Breached: true, Value: 3.0 / 52, Threshold: 0.05,
				Detail: "3 of 52 devices failed (5.769231%) > 5%"}},
			reason: []string{"breached the failure_rate gate", "pausing"},
		},
		{
			name:   "a following campaign that is paused waits",
			edit:   follow(func(c *Campaign) { c.State, c.FollowingSince = StatePaused, timePtr(testNow.Add(-time.Hour)) }),
			stats:  StageStats{Targets: 52, Succeeded: 50, Pending: 2},
			want:   Decision{Action: ActionWait},
			reason: []string{"campaign is paused"},
		},
		{
			name:   "follow does not change the stages before the last",
			edit:   func(c *Campaign) { c.Follow, c.Stages[0].Soak = true, 0 },
			stats:  StageStats{Targets: 5, Succeeded: 5},
			want:   Decision{Action: ActionAdvance, Gate: passingCanary},
			reason: []string{`advancing to stage 2 "10%"`},
		},
	})
}

func TestFollowDue(t *testing.T) {
	every := 10 * time.Second
	tests := []struct {
		name string
		edit func(*Campaign)
		want bool
	}{
		{name: "not following", edit: func(c *Campaign) {}, want: false},
		{name: "following, never looked", edit: func(c *Campaign) { c.Follow = true }, want: true},
		{name: "looked within the interval", edit: func(c *Campaign) { c.Follow, c.FollowLookedAt = true, timePtr(testNow.Add(-9*time.Second)) }, want: false},
		{name: "looked an interval ago", edit: func(c *Campaign) { c.Follow, c.FollowLookedAt = true, timePtr(testNow.Add(-every)) }, want: true},
		{name: "paused does not look", edit: func(c *Campaign) { c.Follow, c.State = true, StatePaused }, want: false},
		{name: "rolling back does not look", edit: func(c *Campaign) { c.Follow, c.State = true, StateRollingBack }, want: false},
		{name: "aborted does not look", edit: func(c *Campaign) { c.Follow, c.State = true, StateAborted }, want: false},
		{name: "draft does not look", edit: func(c *Campaign) { c.Follow, c.State = true, StateDraft }, want: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testCampaign()
			tt.edit(&c)
			if got := c.FollowDue(testNow, every); got != tt.want {
				t.Errorf("FollowDue = %v, want %v", got, tt.want)
			}
		})
	}
}
