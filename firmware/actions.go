package firmware

import (
	"fmt"
	"strings"
)

// Operator actions on a campaign.
const (
	ActStart    = "start"
	ActPause    = "pause"
	ActResume   = "resume"
	ActAbort    = "abort"
	ActRollback = "rollback"
	// ActApprove lets a stage that requires approval start; it is offered
	// only in awaiting_approval, which a campaign reaches once the previous
	// stage has soaked and passed its gates.
	ActApprove = "approve"
)

// allActions are the operator actions, in the order Actions lists them.
var allActions = []string{ActStart, ActApprove, ActPause, ActResume, ActAbort, ActRollback}

// Actions lists, in a stable order, what an operator may do to a campaign in
// state s. The API returns it with every campaign, so that clients (the
// console, fleetctl) show exactly what Transition accepts.
func Actions(s CampaignState) []string {
	switch s {
	case StateDraft:
		return []string{ActStart}
	case StateRunning:
		return []string{ActPause, ActAbort, ActRollback}
	case StatePaused:
		return []string{ActResume, ActAbort, ActRollback}
	case StateAwaitingApproval:
		return []string{ActApprove, ActAbort, ActRollback}
	case StateRollingBack:
		return []string{ActPause, ActAbort}
	case StateCompleted, StateAborted:
		return []string{ActRollback}
	}
	return []string{}
}

// Transition returns the state an operator's action takes a campaign in
// state s to. rollbackStarted says whether the campaign has rollback jobs: a
// paused rollback resumes as a rollback. An action the state does not allow
// is ErrConflict; an unknown action is a *ValidationError naming "action".
func Transition(s CampaignState, action string, rollbackStarted bool) (CampaignState, error) {
	known := false
	for _, a := range allActions {
		known = known || a == action
	}
	if !known {
		return s, invalid("action", "unknown action %q (%s)", action, strings.Join(allActions, ", "))
	}
	allowed := false
	for _, a := range Actions(s) {
		allowed = allowed || a == action
	}
	if !allowed {
		return s, fmt.Errorf("cannot %s a campaign that is %s: %w", action, s, ErrConflict)
	}
	switch action {
	case ActStart, ActApprove:
		return StateRunning, nil
	case ActPause:
		return StatePaused, nil
	case ActResume:
		if rollbackStarted {
			return StateRollingBack, nil
		}
		return StateRunning, nil
	case ActAbort:
		return StateAborted, nil
	}
	return StateRollingBack, nil // ActRollback
}
