package firmware

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestTransition(t *testing.T) {
	all := []CampaignState{StateDraft, StateRunning, StatePaused, StateAwaitingApproval, StateRollingBack, StateCompleted, StateAborted, StateRolledBack}
	// want[state][action] is the state the action leads to; absent: conflict.
	want := map[CampaignState]map[string]CampaignState{
		StateDraft:   {ActStart: StateRunning},
		StateRunning: {ActPause: StatePaused, ActAbort: StateAborted, ActRollback: StateRollingBack},
		StatePaused:  {ActResume: StateRunning, ActAbort: StateAborted, ActRollback: StateRollingBack},
		// Approval is offered only once the campaign waits for it: never
		// while the previous stage runs, soaks or is paused by a gate.
		StateAwaitingApproval: {ActApprove: StateRunning, ActAbort: StateAborted, ActRollback: StateRollingBack},
		StateRollingBack:      {ActPause: StatePaused, ActAbort: StateAborted},
		StateCompleted:        {ActRollback: StateRollingBack},
		StateAborted:          {ActRollback: StateRollingBack},
		StateRolledBack:       {},
	}
	for _, s := range all {
		for _, a := range []string{ActStart, ActApprove, ActPause, ActResume, ActAbort, ActRollback} {
			t.Run(string(s)+"/"+a, func(t *testing.T) {
				got, err := Transition(s, a, false)
				next, ok := want[s][a]
				switch {
				case ok && err != nil:
					t.Fatalf("want %s, got %v", next, err)
				case ok && got != next:
					t.Fatalf("got %s, want %s", got, next)
				case !ok && !errors.Is(err, ErrConflict):
					t.Fatalf("want ErrConflict, got %s, %v", got, err)
				}
			})
		}
		// Actions lists exactly the allowed ones.
		allowed := []string{}
		for _, a := range []string{ActStart, ActApprove, ActPause, ActResume, ActAbort, ActRollback} {
			if _, ok := want[s][a]; ok {
				allowed = append(allowed, a)
			}
		}
		if diff := cmp.Diff(allowed, Actions(s)); diff != "" {
			t.Errorf("Actions(%s) mismatch (-want +got):\n%s", s, diff)
		}
	}
	if got, err := Transition(StatePaused, ActResume, true); err != nil || got != StateRollingBack {
		t.Errorf("resume of a paused rollback: %s, %v; want rolling_back", got, err)
	}
	// A campaign that follows the fleet stays running once its stages have
	// passed (Next never completes it), so the operator's actions are a
	// running campaign's: pause stops it looking and dispatching until
	// resumed (it then reads on from where it left off), abort ends it for
	// good (nothing is undone), rollback sends every device it moved back.
	// The table above is the whole story; there is no follow-only action.
	if diff := cmp.Diff([]string{ActPause, ActAbort, ActRollback}, Actions(StateRunning)); diff != "" {
		t.Errorf("a following campaign's actions mismatch (-want +got):\n%s", diff)
	}
	var ve *ValidationError
	if _, err := Transition(StateRunning, "explode", false); !errors.As(err, &ve) || ve.Field != "action" {
		t.Errorf("unknown action: %v, want a ValidationError on action", err)
	}
}
