package firmware

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
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

func TestCampaignNext(t *testing.T) {
	passingCanary := &GateResult{Gate: GateFailureRate, Value: 0, Threshold: 0.2, Detail: "0 of 5 devices failed (0%) <= 20%"}

	tests := []struct {
		name   string
		edit   func(*Campaign)
		stats  StageStats
		want   Decision
		reason []string // substrings Reason must contain
		not    []string // substrings Reason must not contain
	}{
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

		// failure_rate gate.
		{
			name:  "canary: 2 of 5 failed pauses before the rest is sent",
			stats: StageStats{Targets: 5, Pending: 3, Failed: 2},
			want: Decision{Action: ActionPause, Gate: &GateResult{
				Gate: GateFailureRate, Breached: true, Value: 0.4, Threshold: 0.2, Detail: "2 of 5 devices failed (40%) > 20%",
			}},
			reason: []string{`stage 1 "canary" breached the failure_rate gate`, "2 of 5 devices failed (40%) > 20%", "pausing"},
		},
		{
			name:  "failure_rate breach aborts when gate_action is abort",
			edit:  func(c *Campaign) { c.GateAction = GateActionAbort },
			stats: StageStats{Targets: 5, Pending: 3, Failed: 2},
			want: Decision{Action: ActionAbort, Gate: &GateResult{
				Gate: GateFailureRate, Breached: true, Value: 0.4, Threshold: 0.2, Detail: "2 of 5 devices failed (40%) > 20%",
			}},
			reason: []string{"aborting"},
		},
		{
			name:  "explicit pause gate_action pauses",
			edit:  func(c *Campaign) { c.GateAction = GateActionPause },
			stats: StageStats{Targets: 5, Pending: 3, Failed: 2},
			want: Decision{Action: ActionPause, Gate: &GateResult{
				Gate: GateFailureRate, Breached: true, Value: 0.4, Threshold: 0.2, Detail: "2 of 5 devices failed (40%) > 20%",
			}},
		},
		{
			name:  "failed and timed out count together",
			stats: StageStats{Targets: 5, Pending: 2, Succeeded: 1, Failed: 1, TimedOut: 1},
			want: Decision{Action: ActionPause, Gate: &GateResult{
				Gate: GateFailureRate, Breached: true, Value: 0.4, Threshold: 0.2, Detail: "2 of 5 devices failed (40%) > 20%",
			}},
		},
		{
			name:  "failure_rate exactly at the limit keeps dispatching",
			edit:  func(c *Campaign) { c.Stages[0].MaxNotBackOnline = -1 },
			stats: StageStats{Targets: 5, Pending: 4, TimedOut: 1},
			want:  Decision{Action: ActionDispatch, Dispatch: 4},
		},
		{
			name:  "failure_rate at a limit float arithmetic puts below it (0.29 × 100)",
			edit:  func(c *Campaign) { c.Stage = 2; c.Stages[2].MaxFailureRate = 0.29 },
			stats: StageStats{Targets: 100, Pending: 10, Succeeded: 61, Failed: 29},
			want:  Decision{Action: ActionDispatch, Dispatch: 10},
		},
		{
			name:  "failure_rate one over a float limit breaches",
			edit:  func(c *Campaign) { c.Stage = 2; c.Stages[2].MaxFailureRate = 0.29 },
			stats: StageStats{Targets: 100, Pending: 10, Succeeded: 60, Failed: 30},
			want: Decision{Action: ActionPause, Gate: &GateResult{
				Gate: GateFailureRate, Breached: true, Value: 0.3, Threshold: 0.29, Detail: "30 of 100 devices failed (30%) > 29%",
			}},
		},
		{
			name:  "zero failure rate: one failure breaches",
			edit:  func(c *Campaign) { c.Stages[0].MaxFailureRate = 0 },
			stats: StageStats{Targets: 5, Pending: 4, Failed: 1},
			want: Decision{Action: ActionPause, Gate: &GateResult{
				Gate: GateFailureRate, Breached: true, Value: 0.2, Threshold: 0, Detail: "1 of 5 devices failed (20%) > 0%",
			}},
		},
		{
			name:  "failure_rate breach during the soak pauses",
			edit:  func(c *Campaign) { c.StageDoneAt = timePtr(testNow.Add(-10 * time.Minute)) },
			stats: StageStats{Targets: 5, Succeeded: 3, TimedOut: 2},
			want: Decision{Action: ActionPause, Gate: &GateResult{
				Gate: GateFailureRate, Breached: true, Value: 0.4, Threshold: 0.2, Detail: "2 of 5 devices failed (40%) > 20%",
			}},
		},
		{
			name: "first breached gate wins",
			edit: func(c *Campaign) { c.GateAction = GateActionAbort },
			stats: StageStats{Targets: 5, Succeeded: 2, TimedOut: 3, NotBackOnline: 3,
				UpgradedDisconnectsPerHour: 50, FleetDisconnectsPerHour: 1, UpgradedDeviceHours: 1},
			want: Decision{Action: ActionAbort, Gate: &GateResult{
				Gate: GateFailureRate, Breached: true, Value: 0.6, Threshold: 0.2, Detail: "3 of 5 devices failed (60%) > 20%",
			}},
		},

		// not_back_online gate.
		{
			name:  "not_back_online over the limit pauses",
			edit:  func(c *Campaign) { c.Stages[0].MaxFailureRate = 1 },
			stats: StageStats{Targets: 5, Pending: 3, Succeeded: 1, TimedOut: 1, NotBackOnline: 1},
			want: Decision{Action: ActionPause, Gate: &GateResult{
				Gate: GateNotBackOnline, Breached: true, Value: 1, Threshold: 0, Detail: "1 device not back online > 0",
			}},
			reason: []string{`stage 1 "canary" breached the not_back_online gate`, "pausing"},
		},
		{
			name:  "not_back_online over the limit aborts",
			edit:  func(c *Campaign) { c.GateAction = GateActionAbort; c.Stage = 1 },
			stats: StageStats{Targets: 100, Pending: 50, Succeeded: 40, TimedOut: 2, InFlight: 8, NotBackOnline: 2},
			want: Decision{Action: ActionAbort, Gate: &GateResult{
				Gate: GateNotBackOnline, Breached: true, Value: 2, Threshold: 1, Detail: "2 devices not back online > 1",
			}},
			reason: []string{`stage 2 "10%" breached the not_back_online gate`, "aborting"},
		},
		{
			name:  "not_back_online at the limit keeps dispatching",
			edit:  func(c *Campaign) { c.Stage = 1 },
			stats: StageStats{Targets: 100, Pending: 50, Succeeded: 49, TimedOut: 1, NotBackOnline: 1},
			want:  Decision{Action: ActionDispatch, Dispatch: 50},
		},
		{
			name:  "not_back_online -1 has no limit",
			edit:  func(c *Campaign) { c.Stage = 2; c.Stages[2].MaxFailureRate = 1 },
			stats: StageStats{Targets: 40, Pending: 10, TimedOut: 30, NotBackOnline: 30},
			want:  Decision{Action: ActionDispatch, Dispatch: 10},
		},

		// connectivity gate.
		{
			name:  "connectivity gate off ignores disconnects",
			edit:  func(c *Campaign) { c.Stages[0].ConnectivityRatio = 0 },
			stats: StageStats{Targets: 5, Pending: 2, Succeeded: 3, UpgradedDisconnectsPerHour: 100, FleetDisconnectsPerHour: 0.1, UpgradedDeviceHours: 10},
			want:  Decision{Action: ActionDispatch, Dispatch: 2},
		},
		{
			name:  "connectivity gate with too little evidence does not judge",
			stats: StageStats{Targets: 5, Pending: 2, Succeeded: 3, UpgradedDisconnectsPerHour: 100, FleetDisconnectsPerHour: 0.1, UpgradedDeviceHours: 0.04},
			want:  Decision{Action: ActionDispatch, Dispatch: 2},
		},
		{
			name:   "connectivity gate without evidence says so when advancing",
			edit:   func(c *Campaign) { c.StageDoneAt = timePtr(testNow.Add(-time.Hour)) },
			stats:  StageStats{Targets: 5, Succeeded: 5, UpgradedDisconnectsPerHour: 100, UpgradedDeviceHours: 0.04},
			want:   Decision{Action: ActionAdvance, Gate: passingCanary},
			reason: []string{"connectivity not judged (0.04 of 0.05 device-hours of evidence)"},
		},
		{
			name:  "connectivity above ratio × fleet pauses",
			stats: StageStats{Targets: 5, Pending: 2, Succeeded: 3, UpgradedDisconnectsPerHour: 6.5, FleetDisconnectsPerHour: 3, UpgradedDeviceHours: 1},
			want: Decision{Action: ActionPause, Gate: &GateResult{
				Gate: GateConnectivity, Breached: true, Value: 6.5, Threshold: 6,
				Detail: "upgraded devices disconnect 6.5/device-hour over 1 device-hours > 2 × max(fleet 3, 1) = 6",
			}},
			reason: []string{`stage 1 "canary" breached the connectivity gate`, "pausing"},
		},
		{
			name:  "connectivity breach aborts when gate_action is abort",
			edit:  func(c *Campaign) { c.GateAction = GateActionAbort },
			stats: StageStats{Targets: 5, Succeeded: 5, UpgradedDisconnectsPerHour: 6.5, FleetDisconnectsPerHour: 3, UpgradedDeviceHours: MinConnectivityHours},
			want: Decision{Action: ActionAbort, Gate: &GateResult{
				Gate: GateConnectivity, Breached: true, Value: 6.5, Threshold: 6,
				Detail: "upgraded devices disconnect 6.5/device-hour over 0.05 device-hours > 2 × max(fleet 3, 1) = 6",
			}},
		},
		{
			name:  "connectivity exactly at ratio × fleet keeps dispatching",
			stats: StageStats{Targets: 5, Pending: 2, Succeeded: 3, UpgradedDisconnectsPerHour: 6, FleetDisconnectsPerHour: 3, UpgradedDeviceHours: 1},
			want:  Decision{Action: ActionDispatch, Dispatch: 2},
		},
		{
			name:  "spotless fleet: floor of 1/device-hour keeps a few disconnects under the gate",
			stats: StageStats{Targets: 5, Pending: 2, Succeeded: 3, UpgradedDisconnectsPerHour: 2, FleetDisconnectsPerHour: 0, UpgradedDeviceHours: 1},
			want:  Decision{Action: ActionDispatch, Dispatch: 2},
		},
		{
			name:  "spotless fleet: above the floor breaches",
			stats: StageStats{Targets: 5, Pending: 2, Succeeded: 3, UpgradedDisconnectsPerHour: 2.5, FleetDisconnectsPerHour: 0, UpgradedDeviceHours: 1},
			want: Decision{Action: ActionPause, Gate: &GateResult{
				Gate: GateConnectivity, Breached: true, Value: 2.5, Threshold: 2,
				Detail: "upgraded devices disconnect 2.5/device-hour over 1 device-hours > 2 × max(fleet 0, 1) = 2",
			}},
		},

		// Rollback.
		{
			name:   "rollback dispatches with pacing",
			edit:   func(c *Campaign) { c.State = StateRollingBack; c.Pacing = Pacing{MaxConcurrent: 4} },
			stats:  StageStats{Targets: 10, Pending: 9, InFlight: 1},
			want:   Decision{Action: ActionDispatch, Dispatch: 3},
			reason: []string{"rollback: dispatching 3 jobs of 9 pending"},
		},
		{
			name:  "rollback ignores gates",
			edit:  func(c *Campaign) { c.State = StateRollingBack; c.GateAction = GateActionAbort },
			stats: StageStats{Targets: 10, Pending: 5, Failed: 5, NotBackOnline: 5, UpgradedDisconnectsPerHour: 99, UpgradedDeviceHours: 9},
			want:  Decision{Action: ActionDispatch, Dispatch: 5},
		},
		{
			name: "rollback paced out waits",
			edit: func(c *Campaign) {
				c.State = StateRollingBack
				c.Pacing = Pacing{DevicesPerMinute: 5}
				c.PacedUntil = testNow.Add(time.Second)
			},
			stats:  StageStats{Targets: 10, Pending: 5, InFlight: 5},
			want:   Decision{Action: ActionWait},
			reason: []string{"rollback: pacing"},
		},
		{
			name:   "rollback waits for in-flight jobs",
			edit:   func(c *Campaign) { c.State = StateRollingBack },
			stats:  StageStats{Targets: 10, InFlight: 1, Succeeded: 9},
			want:   Decision{Action: ActionWait},
			reason: []string{"rollback: waiting for 1 device"},
		},
		{
			name:   "rollback finished",
			edit:   func(c *Campaign) { c.State = StateRollingBack },
			stats:  StageStats{Targets: 10, Succeeded: 8, Failed: 1, TimedOut: 1},
			want:   Decision{Action: ActionRolledBack},
			reason: []string{"rollback finished", "8 succeeded, 1 failed, 1 timed out of 10"},
		},
		{
			name:  "rollback with nothing to roll back finishes",
			edit:  func(c *Campaign) { c.State = StateRollingBack },
			stats: StageStats{},
			want:  Decision{Action: ActionRolledBack},
		},
	}
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

// TestCampaignNextWalk drives a campaign through every stage the way the
// dispatcher would, to check that the decisions chain up.
func TestCampaignNextWalk(t *testing.T) {
	c := testCampaign()
	c.Pacing = Pacing{MaxConcurrent: 20}
	now := testNow
	var actions []Action
	for step := 0; step < 1000 && c.State == StateRunning; step++ {
		targets := StageTargets(c.Stages, c.Total, c.Stage)
		// Every job the dispatcher sends succeeds before the next call.
		stats := StageStats{Targets: targets, Succeeded: targets}
		d := c.Next(stats, now)
		if len(actions) == 0 || actions[len(actions)-1] != d.Action {
			actions = append(actions, d.Action)
		}
		switch d.Action {
		case ActionSoak:
			c.StageDoneAt = timePtr(now)
		case ActionWait:
			now = now.Add(time.Minute)
		case ActionAdvance:
			c.Stage++
			c.StageDoneAt = nil
		case ActionComplete:
			c.State = StateCompleted
		default:
			t.Fatalf("step %d: unexpected %+v", step, d)
		}
	}
	if c.State != StateCompleted {
		t.Fatalf("campaign did not complete: %+v", c)
	}
	want := []Action{
		ActionSoak, ActionWait, ActionAdvance, // canary
		ActionSoak, ActionWait, ActionAdvance, // 10%
		ActionSoak, ActionWait, ActionAdvance, // 50%
		ActionSoak, ActionWait, ActionComplete, // all
	}
	if diff := cmp.Diff(want, actions); diff != "" {
		t.Errorf("actions mismatch (-want +got):\n%s", diff)
	}
	if got, want := now.Sub(testNow), 3*time.Hour; got != want {
		t.Errorf("campaign took %s of soak, want %s", got, want)
	}
}

// TestPacingHoldsTheRate steps a paced campaign the way the dispatcher does,
// at several step intervals with jitter and an occasional stalled step, and
// checks that the jobs go out at the configured rate (within one job per
// step of rounding) and never in a batch larger than the catch-up window.
func TestPacingHoldsTheRate(t *testing.T) {
	for _, tc := range []struct {
		perMinute int
		step      time.Duration
	}{
		{60, time.Second}, {600, 250 * time.Millisecond}, {6000, time.Second}, {6000, 100 * time.Millisecond},
		{60000, time.Second}, {100000, 700 * time.Millisecond}, {7, 300 * time.Millisecond},
	} {
		t.Run(fmt.Sprintf("%d a minute, step %s", tc.perMinute, tc.step), func(t *testing.T) {
			c := testCampaign()
			c.Stage = 3
			c.Pacing = Pacing{DevicesPerMinute: tc.perMinute}
			c.PacedUntil = testNow
			const run = 10 * time.Minute
			maxBatch := int(PacingCatchUp*time.Duration(tc.perMinute)/time.Minute) + 1
			now, sent := testNow, 0
			for step := 0; now.Before(testNow.Add(run)); step++ {
				d := c.Next(StageStats{Targets: 1 << 30, Pending: 1<<30 - sent}, now)
				if d.Action == ActionDispatch {
					if d.Dispatch > maxBatch {
						t.Fatalf("step %d sent %d jobs at once; the catch-up window allows %d", step, d.Dispatch, maxBatch)
					}
					sent += d.Dispatch
					c.PacedUntil = d.PacedUntil
				} else if d.Action != ActionWait {
					t.Fatalf("step %d: %+v", step, d)
				}
				// The ticker's jitter, and every 50th step a stall of 2.5 s
				// (a slow transaction) that the schedule must make up.
				now = now.Add(tc.step + time.Duration(step%7)*time.Millisecond)
				if step%50 == 49 {
					now = now.Add(2500 * time.Millisecond)
				}
			}
			want := float64(tc.perMinute) * now.Sub(testNow).Minutes()
			if dev := (float64(sent) - want) / want; dev < -0.01 || dev > 0.01 {
				t.Errorf("sent %d jobs in %s, want %.0f (%+.2f%%)", sent, now.Sub(testNow), want, 100*dev)
			}
		})
	}
}

func TestCampaignValidate(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(*Campaign)
		field string // "" = valid
	}{
		{name: "valid", edit: func(*Campaign) {}},
		{name: "valid with abort", edit: func(c *Campaign) { c.GateAction = GateActionAbort }},
		{name: "valid with pause", edit: func(c *Campaign) { c.GateAction = GateActionPause }},
		{name: "valid canary-only campaign", edit: func(c *Campaign) { c.Stages = c.Stages[:1] }},
		{name: "valid last stage is a count", edit: func(c *Campaign) {
			c.Stages = []Stage{{Percent: 10, MaxNotBackOnline: -1}, {Count: 20}}
		}},
		{name: "valid equal percents", edit: func(c *Campaign) { c.Stages[2].Percent = 10 }},
		{name: "valid zero soak", edit: func(c *Campaign) { c.Stages[0].Soak = 0 }},
		{name: "valid fractional percent", edit: func(c *Campaign) { c.Stages[1].Percent = 0.5 }},

		{name: "name missing", edit: func(c *Campaign) { c.Name = "  " }, field: "name"},
		{name: "firmware missing", edit: func(c *Campaign) { c.FirmwareID = "" }, field: "firmware_id"},
		{name: "no stages", edit: func(c *Campaign) { c.Stages = nil }, field: "stages"},
		{name: "count and percent", edit: func(c *Campaign) { c.Stages[1].Count = 3 }, field: "stages[1]"},
		{name: "neither count nor percent", edit: func(c *Campaign) { c.Stages[0].Count = 0 }, field: "stages[0]"},
		{name: "negative count", edit: func(c *Campaign) { c.Stages[0].Count = -1 }, field: "stages[0].count"},
		{name: "negative percent", edit: func(c *Campaign) { c.Stages[1].Percent = -10 }, field: "stages[1].percent"},
		{name: "percent over 100", edit: func(c *Campaign) { c.Stages[3].Percent = 101 }, field: "stages[3].percent"},
		{name: "percent decreases", edit: func(c *Campaign) { c.Stages[2].Percent = 5 }, field: "stages[2].percent"},
		{name: "last percent below 100", edit: func(c *Campaign) { c.Stages[3].Percent = 90 }, field: "stages[3].percent"},
		{name: "negative soak", edit: func(c *Campaign) { c.Stages[1].Soak = Duration(-time.Second) }, field: "stages[1].soak"},
		{name: "failure rate above 1", edit: func(c *Campaign) { c.Stages[0].MaxFailureRate = 1.5 }, field: "stages[0].max_failure_rate"},
		{name: "negative failure rate", edit: func(c *Campaign) { c.Stages[2].MaxFailureRate = -0.1 }, field: "stages[2].max_failure_rate"},
		{name: "not back online below -1", edit: func(c *Campaign) { c.Stages[0].MaxNotBackOnline = -2 }, field: "stages[0].max_not_back_online"},
		{name: "negative connectivity ratio", edit: func(c *Campaign) { c.Stages[0].ConnectivityRatio = -1 }, field: "stages[0].connectivity_ratio"},
		{name: "negative devices per minute", edit: func(c *Campaign) { c.Pacing.DevicesPerMinute = -1 }, field: "pacing.devices_per_minute"},
		{name: "negative max concurrent", edit: func(c *Campaign) { c.Pacing.MaxConcurrent = -1 }, field: "pacing.max_concurrent"},
		{name: "zero device timeout", edit: func(c *Campaign) { c.DeviceTimeout = 0 }, field: "device_timeout"},
		{name: "negative device timeout", edit: func(c *Campaign) { c.DeviceTimeout = Duration(-time.Minute) }, field: "device_timeout"},
		{name: "unknown gate action", edit: func(c *Campaign) { c.GateAction = "rollback" }, field: "gate_action"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testCampaign()
			tt.edit(&c)
			before := fmt.Sprintf("%+v", c)
			err := c.Validate()
			if after := fmt.Sprintf("%+v", c); after != before {
				t.Errorf("Validate changed the campaign")
			}
			if tt.field == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("Validate() = %v, want a *ValidationError for %s", err, tt.field)
			}
			if diff := cmp.Diff(tt.field, ve.FieldName()); diff != "" {
				t.Errorf("field mismatch (-want +got):\n%s\nerror: %v", diff, err)
			}
			if !strings.HasPrefix(err.Error(), tt.field+": ") || ve.Msg == "" {
				t.Errorf("error %q does not name %s with a message", err, tt.field)
			}
		})
	}
}

func TestCampaignNormalize(t *testing.T) {
	c := testCampaign()
	c.Normalize()
	if diff := cmp.Diff(GateActionPause, c.GateAction); diff != "" {
		t.Errorf("default gate action mismatch (-want +got):\n%s", diff)
	}
	c.GateAction = GateActionAbort
	c.Normalize()
	if diff := cmp.Diff(GateActionAbort, c.GateAction); diff != "" {
		t.Errorf("explicit gate action mismatch (-want +got):\n%s", diff)
	}
}

func TestCampaignDurationJSON(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Duration
		wantErr bool
	}{
		{name: "string", in: `"30s"`, want: Duration(30 * time.Second)},
		{name: "compound string", in: `"1h30m"`, want: Duration(90 * time.Minute)},
		{name: "seconds", in: `45`, want: Duration(45 * time.Second)},
		{name: "fractional seconds", in: `1.5`, want: Duration(1500 * time.Millisecond)},
		{name: "zero", in: `0`, want: 0},
		{name: "bad string", in: `"soon"`, wantErr: true},
		{name: "bool", in: `true`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var d Duration
			err := json.Unmarshal([]byte(tt.in), &d)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Unmarshal(%s) error = %v, wantErr %v", tt.in, err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, d); !tt.wantErr && diff != "" {
				t.Errorf("Unmarshal(%s) mismatch (-want +got):\n%s", tt.in, diff)
			}
		})
	}

	s := Stage{Name: "canary", Count: 5, Soak: Duration(90 * time.Second), MaxNotBackOnline: -1}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(`{"name":"canary","count":5,"soak":"1m30s","max_failure_rate":0,"max_not_back_online":-1}`, string(b)); diff != "" {
		t.Errorf("Marshal mismatch (-want +got):\n%s", diff)
	}
	var back Stage
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(s, back); diff != "" {
		t.Errorf("round trip mismatch (-want +got):\n%s", diff)
	}
}

func TestStageTargets(t *testing.T) {
	canaryThenPercents := []Stage{{Count: 5}, {Percent: 10}, {Percent: 50}, {Percent: 100}}
	tests := []struct {
		name   string
		stages []Stage
		total  int
		want   []int
	}{
		{name: "canary 5 then 10/50/100 % of 100", stages: canaryThenPercents, total: 100, want: []int{5, 5, 40, 50}},
		{name: "canary 5 then 10/50/100 % of 3", stages: canaryThenPercents, total: 3, want: []int{3, 0, 0, 0}},
		{name: "canary 5 then 10/50/100 % of 7", stages: canaryThenPercents, total: 7, want: []int{5, 0, 0, 2}},
		{name: "percents round up", stages: []Stage{{Percent: 10}, {Percent: 50}, {Percent: 100}}, total: 7, want: []int{1, 3, 3}},
		{name: "small percent of a small fleet reaches one device", stages: []Stage{{Percent: 1}, {Percent: 100}}, total: 3, want: []int{1, 2}},
		{name: "float noise does not round up (64.4 % of 250 = 161)", stages: []Stage{{Percent: 64.4}, {Percent: 100}}, total: 250, want: []int{161, 89}},
		{name: "count capped at what is left", stages: []Stage{{Count: 5}, {Count: 10}}, total: 12, want: []int{5, 7}},
		{name: "count-only campaign leaves the rest", stages: []Stage{{Count: 5}, {Count: 10}}, total: 100, want: []int{5, 10}},
		{name: "percent already reached by a count is empty", stages: []Stage{{Count: 20}, {Percent: 10}, {Percent: 100}}, total: 100, want: []int{20, 0, 80}},
		{name: "equal percents", stages: []Stage{{Percent: 50}, {Percent: 50}, {Percent: 100}}, total: 10, want: []int{5, 0, 5}},
		{name: "no devices", stages: canaryThenPercents, total: 0, want: []int{0, 0, 0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := make([]int, len(tt.stages))
			for i := range tt.stages {
				got[i] = StageTargets(tt.stages, tt.total, i)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("StageTargets mismatch (-want +got):\n%s", diff)
			}
		})
	}

	t.Run("out of range", func(t *testing.T) {
		for _, i := range []int{-1, 4} {
			if got := StageTargets(canaryThenPercents, 100, i); got != 0 {
				t.Errorf("StageTargets(i=%d) = %d, want 0", i, got)
			}
		}
	})

	t.Run("a campaign ending at 100 percent covers every device exactly once", func(t *testing.T) {
		stages := []Stage{{Count: 3}, {Percent: 1}, {Percent: 12.5}, {Percent: 33.3}, {Percent: 64.4}, {Percent: 100}}
		for total := 0; total <= 2000; total++ {
			sum := 0
			for i := range stages {
				n := StageTargets(stages, total, i)
				if n < 0 {
					t.Fatalf("total %d stage %d: %d devices", total, i, n)
				}
				sum += n
			}
			if sum != total {
				t.Fatalf("total %d: stages cover %d devices", total, sum)
			}
		}
	})
}

func TestSelectDevices(t *testing.T) {
	ids := make([]string, 50)
	for i := range ids {
		ids[i] = fmt.Sprintf("gw-%03d", i)
	}
	input := slices.Clone(ids)

	got := SelectDevices("cmp-1", ids)

	t.Run("input untouched", func(t *testing.T) {
		if diff := cmp.Diff(input, ids); diff != "" {
			t.Errorf("input changed (-want +got):\n%s", diff)
		}
	})
	t.Run("deterministic", func(t *testing.T) {
		if diff := cmp.Diff(got, SelectDevices("cmp-1", ids)); diff != "" {
			t.Errorf("second call mismatch (-want +got):\n%s", diff)
		}
	})
	t.Run("permutation of the input", func(t *testing.T) {
		if diff := cmp.Diff(ids, got, cmpopts.SortSlices(func(a, b string) bool { return a < b })); diff != "" {
			t.Errorf("not a permutation (-want +got):\n%s", diff)
		}
		if len(got) != len(ids) {
			t.Errorf("got %d ids, want %d", len(got), len(ids))
		}
	})
	t.Run("independent of input order", func(t *testing.T) {
		reversed := slices.Clone(ids)
		slices.Reverse(reversed)
		rotated := append(slices.Clone(ids[17:]), ids[:17]...)
		for _, in := range [][]string{reversed, rotated} {
			if diff := cmp.Diff(got, SelectDevices("cmp-1", in)); diff != "" {
				t.Errorf("order depends on input (-want +got):\n%s", diff)
			}
		}
	})
	t.Run("not alphabetical", func(t *testing.T) {
		if slices.Equal(got, ids) {
			t.Errorf("SelectDevices kept the alphabetical order")
		}
	})
	t.Run("another campaign picks other canaries", func(t *testing.T) {
		other := SelectDevices("cmp-2", ids)
		if slices.Equal(got, other) {
			t.Fatalf("cmp-1 and cmp-2 order the devices the same way")
		}
		if slices.Equal(got[:5], other[:5]) {
			t.Errorf("cmp-1 and cmp-2 share the same 5 canaries: %v", got[:5])
		}
	})
	t.Run("duplicates and empty", func(t *testing.T) {
		if diff := cmp.Diff([]string{"a", "a"}, SelectDevices("c", []string{"a", "a"})); diff != "" {
			t.Errorf("duplicates mismatch (-want +got):\n%s", diff)
		}
		if got := SelectDevices("c", nil); len(got) != 0 {
			t.Errorf("SelectDevices(nil) = %v, want empty", got)
		}
	})
}
