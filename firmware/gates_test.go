package firmware

import (
	"testing"
	"time"
)

// TestCampaignNextGates covers each health gate and the rollback.
func TestCampaignNextGates(t *testing.T) {
	runNextCases(t, []nextCase{
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
	})
}
