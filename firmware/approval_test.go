package firmware

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"testing"
	"time"
)

// TestDispatcherApproval runs a canary, then a stage that requires
// approval: approving is refused while the canary runs and soaks, the
// campaign waits in awaiting_approval once the canary passed, dispatches
// nothing of the next stage until an operator approves, and the history
// says who approved which stage.
func TestDispatcherApproval(t *testing.T) {
	ctx := context.Background()
	d := newDispatcher(t, "gw-1", "gw-2", "gw-3", "gw-4")
	v := d.start(Spec{Name: "approved", Stages: []Stage{
		{Name: "canary", Count: 1, Soak: Duration(10 * time.Minute), MaxFailureRate: 0, MaxNotBackOnline: 0},
		{Name: "rest", Percent: 100, MaxFailureRate: 0.5, MaxNotBackOnline: -1, RequiresApproval: true},
	}})
	approve := func() error {
		_, err := d.c.Act(ctx, v.ID, ActApprove, "alice@ops")
		return err
	}
	d.step(time.Second)
	jobs := d.send.jobs()
	if len(jobs) != 1 {
		t.Fatalf("canary: %d jobs sent, want 1", len(jobs))
	}
	if err := approve(); !errors.Is(err, ErrConflict) {
		t.Fatalf("approve while the canary runs: %v, want ErrConflict", err)
	}
	d.c.birth(ctx, jobs[0].Manifest.DeviceID, "2.0.0")
	d.step(time.Second) // every canary finished: the soak starts
	d.step(5 * time.Minute)
	if err := approve(); !errors.Is(err, ErrConflict) {
		t.Fatalf("approve while the canary soaks: %v, want ErrConflict", err)
	}
	d.step(6 * time.Minute) // the soak is over: advance to the next stage
	d.step(time.Second)     // which requires approval
	got, err := d.c.Get(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != StateAwaitingApproval || got.Stage != 1 || !slices.Equal(got.Actions, []string{ActApprove, ActAbort, ActRollback}) {
		t.Fatalf("after the canary passed: state %s, stage %d, actions %v; want awaiting_approval at stage 1 with approve, abort, rollback", got.State, got.Stage, got.Actions)
	}
	for range 3 {
		d.step(time.Hour)
	}
	if n := len(d.send.jobs()); n != 1 || d.state(v.ID) != StateAwaitingApproval {
		t.Fatalf("three hours unapproved: %d jobs sent, state %s; want 1 and awaiting_approval", n, d.state(v.ID))
	}
	// Resume is not a way around approval.
	if _, err := d.c.Act(ctx, v.ID, ActResume, "bob"); !errors.Is(err, ErrConflict) {
		t.Fatalf("resume while awaiting approval: %v, want ErrConflict", err)
	}

	if err := approve(); err != nil {
		t.Fatal(err)
	}
	if s := d.state(v.ID); s != StateRunning {
		t.Fatalf("approved: state %s, want running", s)
	}
	if err := approve(); !errors.Is(err, ErrConflict) {
		t.Fatalf("a second approval: %v, want ErrConflict", err)
	}
	d.step(time.Second)
	if n := len(d.send.jobs()); n != 4 {
		t.Fatalf("after the approval: %d jobs sent, want 4", n)
	}

	hist, err := d.c.History(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	var approval HistoryEntry
	for _, h := range hist {
		actions = append(actions, h.Action)
		if h.Action == ActApprove {
			approval = h
		}
	}
	if want := []string{"created", "start", "stage_finished", "advance", "awaiting_approval", "approve"}; !slices.Equal(actions, want) {
		t.Fatalf("history %v, want %v", actions, want)
	}
	var detail struct {
		Stage int    `json:"stage"`
		Name  string `json:"name"`
		From  string `json:"from"`
	}
	if err := json.Unmarshal(approval.Detail, &detail); err != nil {
		t.Fatal(err)
	}
	if approval.Actor != "alice@ops" || detail.Stage != 1 || detail.Name != "rest" || detail.From != string(StateAwaitingApproval) {
		t.Fatalf("approval entry %+v (%s), want alice@ops approving stage 1 \"rest\" from awaiting_approval", approval, approval.Detail)
	}
}
