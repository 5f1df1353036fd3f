package firmware

import (
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

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
