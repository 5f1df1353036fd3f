package firmware

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Next decides what the campaign does now, given what the dispatcher
// counted for the current stage. It is pure: the dispatcher executes the
// decision, records its Reason and changes the campaign; calling Next twice
// with the same arguments gives the same decision.
//
//   - Only StateRunning, StateAwaitingApproval (gates only) and
//     StateRollingBack act. Every other state gives
//     ActionWait with a reason ("campaign is paused").
//   - While running, the gates are evaluated on every call, not only at the
//     end of a stage, so that a breach stops dispatch at once (a canary
//     whose first 2 of 5 devices failed against a 20 % limit pauses before
//     the other 3 are sent):
//     failure_rate breaches when Failed+TimedOut > MaxFailureRate × Targets,
//     that is when the stage can no longer end at or under the limit;
//     not_back_online breaches when MaxNotBackOnline >= 0 and NotBackOnline >
//     MaxNotBackOnline; connectivity, when ConnectivityRatio > 0 and
//     UpgradedDeviceHours >= MinConnectivityHours, breaches when
//     UpgradedDisconnectsPerHour > ConnectivityRatio × max(FleetDisconnectsPerHour, 1).
//     The floor of 1 disconnect per device-hour keeps a spotless fleet from
//     turning one disconnect of an upgraded device into a breach.
//     The first breached gate in that order wins: ActionPause when
//     GateAction is "pause" or empty, ActionAbort when it is "abort", with
//     Gate set. Gates stay watched during the soak.
//   - No breach, and the stage has RequiresApproval but Approved <= Stage:
//     ActionAwaitApproval (the dispatcher moves the campaign to
//     awaiting_approval), then ActionWait while it awaits; gates are still
//     judged, before this, so a breach pauses a waiting campaign too. Only
//     an operator's approve (Transition) leaves awaiting_approval.
//   - With Windows, only the pending devices whose zone (Campaign.Zone of
//     their group in PendingByZone) is inside an open window count as
//     ready: none ready gives ActionWait with the next opening; otherwise
//     ActionDispatch is for the open groups only (Decision.Zones), and the
//     pacing schedule is floored at the earliest opening of those windows,
//     so that entering a window starts the schedule afresh, as a resume does.
//   - No breach and Pending > 0: the budget is Pending (or the ready ones), capped by
//     MaxConcurrent − InFlight (when MaxConcurrent > 0) and, when
//     DevicesPerMinute > 0, by the pacing schedule: jobs are due one
//     interval (a minute / DevicesPerMinute) apart from PacedUntil, moved up
//     to now − PacingCatchUp if it lags further; every job due by now may go,
//     and Decision.PacedUntil is the schedule after them. So the long-run
//     rate is exactly DevicesPerMinute however often the campaign is stepped
//     (up to PacingCatchUp apart), and no batch is larger than
//     PacingCatchUp's worth of jobs plus one.
//     A positive budget gives ActionDispatch with Dispatch = budget, else
//     ActionWait naming the pacing limit that holds.
//   - Nothing pending and InFlight > 0: ActionWait.
//   - Every device finished (Pending == 0 and InFlight == 0): if the stage is
//     empty (Targets == 0, e.g. its percent was already reached) or has no
//     soak, ActionAdvance at once, or ActionComplete after the last stage.
//     Otherwise ActionSoak while StageDoneAt is nil (the dispatcher records
//     StageDoneAt = now), ActionWait until StageDoneAt+Soak, then
//     ActionAdvance or ActionComplete with the passing gate numbers in
//     Reason and the failure-rate result in Gate.
//   - A campaign that follows the fleet (Follow) never completes: where
//     the last stage would complete, ActionFollow (the dispatcher records
//     FollowingSince = now) and from then on ActionWait while every device
//     is done. It stays running in its last stage, where the devices that
//     join go: they are dispatched, paced and gated like the stage's
//     others, so a joiner that fails moves the failure rate and can pause
//     the campaign.
//   - StateRollingBack: no gates; the rollback jobs are dispatched with the
//     same pacing, and once none is pending or in flight, ActionRolledBack.
//
// A running campaign whose Stage is not an index of Stages is inconsistent;
// Next pauses it (Gate nil) so that an operator looks rather than have the
// dispatcher act on a stage that does not exist.
func (c Campaign) Next(s StageStats, now time.Time) Decision {
	switch c.State {
	case StateRunning, StateAwaitingApproval:
	case StateRollingBack:
		return c.nextRollback(s, now)
	case StateDraft:
		return Decision{Action: ActionWait, Reason: "campaign is a draft and has not been started"}
	case StatePaused, StateAborted, StateCompleted, StateRolledBack:
		return Decision{Action: ActionWait, Reason: fmt.Sprintf("campaign is %s", c.State)}
	default:
		return Decision{Action: ActionWait, Reason: fmt.Sprintf("campaign state %q does not dispatch", c.State)}
	}

	if c.Stage < 0 || c.Stage >= len(c.Stages) {
		return Decision{Action: ActionPause, Reason: fmt.Sprintf("campaign is at stage index %d but has %d stages; pausing for an operator", c.Stage, len(c.Stages))}
	}
	st := c.Stages[c.Stage]
	name := c.stageName(c.Stage)

	gates := stageGates(st, s)
	for _, g := range gates {
		if !g.Breached {
			continue
		}
		action, verb := ActionPause, "pausing"
		if c.GateAction == GateActionAbort {
			action, verb = ActionAbort, "aborting"
		}
		return Decision{Action: action, Gate: &g, Reason: fmt.Sprintf("%s breached the %s gate: %s; %s", name, g.Gate, g.Detail, verb)}
	}

	if st.RequiresApproval && c.Approved <= c.Stage {
		if c.State == StateAwaitingApproval {
			return Decision{Action: ActionWait, Reason: fmt.Sprintf("%s waits for an operator's approval", name)}
		}
		return Decision{Action: ActionAwaitApproval, Reason: fmt.Sprintf("%s requires an operator's approval before it starts; %s waiting", name, countNoun(s.Pending, "device"))}
	}
	if c.State == StateAwaitingApproval {
		// Approved by now (an approval moves the campaign to running in
		// the same transaction), or the stage no longer asks for it: the
		// operator's approve action is what leaves this state.
		return Decision{Action: ActionWait, Reason: fmt.Sprintf("%s is approved; waiting for the approval to take effect", name)}
	}

	if s.Pending > 0 {
		if len(c.Windows) == 0 {
			return c.pacedDispatch(s, s.Pending, time.Time{}, nil, now, name)
		}
		ws := c.WindowStatus(s.PendingByZone, now)
		if ws.Dispatchable == 0 {
			why := "outside its maintenance windows"
			if !ws.NextWindow.IsZero() {
				why += "; the next opens at " + ws.NextWindow.UTC().Format(time.RFC3339)
			}
			if s.InFlight > 0 {
				why += fmt.Sprintf("; %s in flight", countNoun(s.InFlight, "device"))
			}
			return Decision{Action: ActionWait, Reason: fmt.Sprintf("%s: %d pending %s", name, s.Pending, why)}
		}
		return c.pacedDispatch(s, ws.Dispatchable, ws.OpenedAt, ws.openTags, now, name)
	}
	if s.InFlight > 0 {
		return Decision{Action: ActionWait, Reason: fmt.Sprintf("%s: waiting for %s to finish", name, countNoun(s.InFlight, "device"))}
	}

	if s.Targets > 0 && st.Soak > 0 {
		if c.StageDoneAt == nil {
			until := now.Add(st.Soak.D())
			return Decision{Action: ActionSoak, Reason: fmt.Sprintf("%s: every device finished (%s); soaking for %s until %s", name, statsOutcome(s), st.Soak, until.UTC().Format(time.RFC3339))}
		}
		if until := c.StageDoneAt.Add(st.Soak.D()); now.Before(until) {
			return Decision{Action: ActionWait, Reason: fmt.Sprintf("%s: soaking until %s", name, until.UTC().Format(time.RFC3339))}
		}
	}

	var passed string
	if s.Targets == 0 {
		passed = fmt.Sprintf("%s has no devices to upgrade", name)
	} else {
		details := make([]string, 0, len(gates)+1)
		for _, g := range gates {
			details = append(details, g.Gate+" "+g.Detail)
		}
		if st.ConnectivityRatio == 0 {
			details = append(details, GateConnectivity+" off")
		} else if s.UpgradedDeviceHours < MinConnectivityHours {
			details = append(details, fmt.Sprintf("%s not judged (%.3g of %.3g device-hours of evidence)", GateConnectivity, s.UpgradedDeviceHours, MinConnectivityHours))
		}
		passed = fmt.Sprintf("%s passed (%s): %s", name, statsOutcome(s), strings.Join(details, "; "))
	}
	d := Decision{Action: ActionAdvance, Gate: &gates[0]}
	if c.Stage == len(c.Stages)-1 && c.Follow {
		if c.FollowingSince != nil {
			return Decision{Action: ActionWait, Reason: fmt.Sprintf("%s: following the fleet since %s; every device finished (%s)",
				name, c.FollowingSince.UTC().Format(time.RFC3339), statsOutcome(s))}
		}
		d.Action = ActionFollow
		d.Reason = passed + "; following the fleet"
	} else if c.Stage == len(c.Stages)-1 {
		d.Action = ActionComplete
		d.Reason = passed + "; campaign complete"
	} else {
		d.Reason = fmt.Sprintf("%s; advancing to %s", passed, c.stageName(c.Stage+1))
	}
	return d
}

// nextRollback dispatches the rollback jobs with the campaign's pacing and
// reports ActionRolledBack once none is pending or in flight.
func (c Campaign) nextRollback(s StageStats, now time.Time) Decision {
	if s.Pending > 0 {
		return c.pacedDispatch(s, s.Pending, time.Time{}, nil, now, "rollback")
	}
	if s.InFlight > 0 {
		return Decision{Action: ActionWait, Reason: fmt.Sprintf("rollback: waiting for %s to finish", countNoun(s.InFlight, "device"))}
	}
	return Decision{Action: ActionRolledBack, Reason: fmt.Sprintf("rollback finished: %s", statsOutcome(s))}
}

// pacedDispatch sizes the next batch of at most ready jobs (the pending
// ones, or those whose window is open) under the pacing limits; what says
// whose jobs they are ("stage 1 \"canary\"", "rollback"). A window that
// opened at opened restarts the pacing schedule there, as a resume does:
// the time spent outside the windows is not owed as a burst. zones are the
// open windows' zone groups, nil without windows.
func (c Campaign) pacedDispatch(s StageStats, ready int, opened time.Time, zones []string, now time.Time, what string) Decision {
	p := c.Pacing
	budget := ready
	var limit string // the pacing limit that holds the batch below what is ready
	if p.MaxConcurrent > 0 && p.MaxConcurrent-s.InFlight < budget {
		budget = p.MaxConcurrent - s.InFlight
		limit = fmt.Sprintf("%d in flight of max_concurrent %d", s.InFlight, p.MaxConcurrent)
	}
	var interval time.Duration
	due := c.PacedUntil
	if p.DevicesPerMinute > 0 {
		interval = time.Minute / time.Duration(p.DevicesPerMinute)
		if floor := now.Add(-PacingCatchUp); due.IsZero() {
			due = now
		} else if due.Before(floor) {
			due = floor
		}
		if due.Before(opened) {
			due = opened
		}
		paced := 0
		if !due.After(now) {
			paced = int(now.Sub(due)/interval) + 1
		}
		if paced < budget {
			budget = paced
			limit = fmt.Sprintf("devices_per_minute %d, %s due now", p.DevicesPerMinute, countNoun(paced, "job"))
			if paced == 0 {
				limit = fmt.Sprintf("devices_per_minute %d, next job due at %s", p.DevicesPerMinute, due.UTC().Format("15:04:05.000"))
			}
		}
	}
	inside := ""
	if zones != nil {
		inside = fmt.Sprintf(", %d inside an open maintenance window", ready)
	}
	if budget <= 0 {
		return Decision{Action: ActionWait, Reason: fmt.Sprintf("%s: pacing: %s; %d pending%s", what, limit, s.Pending, inside)}
	}
	d := Decision{Action: ActionDispatch, Dispatch: budget, Zones: zones, Reason: fmt.Sprintf("%s: dispatching %s of %d pending%s", what, countNoun(budget, "job"), s.Pending, inside)}
	if limit != "" {
		d.Reason += " (pacing: " + limit + ")"
	}
	if interval > 0 {
		d.PacedUntil = due.Add(time.Duration(budget) * interval)
	}
	return d
}

// stageGates returns the stage's gate results in the order they are
// judged: failure_rate always, not_back_online when it has a limit,
// connectivity when it is on and has enough evidence.
func stageGates(st Stage, s StageStats) []GateResult {
	bad := s.Failed + s.TimedOut
	rate := 0.0
	if s.Targets > 0 {
		rate = float64(bad) / float64(s.Targets)
	}
	fr := GateResult{
		Gate:      GateFailureRate,
		Breached:  float64(bad) > roundMicro(st.MaxFailureRate*float64(s.Targets)),
		Value:     rate,
		Threshold: st.MaxFailureRate,
	}
	op := "<="
	if fr.Breached {
		op = ">"
	}
	fr.Detail = fmt.Sprintf("%d of %d devices failed (%s) %s %s", bad, s.Targets, formatPercent(rate), op, formatPercent(st.MaxFailureRate))
	gates := []GateResult{fr}

	if st.MaxNotBackOnline >= 0 {
		g := GateResult{
			Gate:      GateNotBackOnline,
			Breached:  s.NotBackOnline > st.MaxNotBackOnline,
			Value:     float64(s.NotBackOnline),
			Threshold: float64(st.MaxNotBackOnline),
		}
		op := "<="
		if g.Breached {
			op = ">"
		}
		g.Detail = fmt.Sprintf("%s not back online %s %d", countNoun(s.NotBackOnline, "device"), op, st.MaxNotBackOnline)
		gates = append(gates, g)
	}

	if st.ConnectivityRatio > 0 && s.UpgradedDeviceHours >= MinConnectivityHours {
		fleet := max(s.FleetDisconnectsPerHour, connectivityFloor)
		g := GateResult{
			Gate:      GateConnectivity,
			Value:     s.UpgradedDisconnectsPerHour,
			Threshold: roundMicro(st.ConnectivityRatio * fleet),
		}
		g.Breached = g.Value > g.Threshold
		op := "<="
		if g.Breached {
			op = ">"
		}
		g.Detail = fmt.Sprintf("upgraded devices disconnect %.3g/device-hour over %.3g device-hours %s %.3g × max(fleet %.3g, %g) = %.3g",
			s.UpgradedDisconnectsPerHour, s.UpgradedDeviceHours, op, st.ConnectivityRatio, s.FleetDisconnectsPerHour, connectivityFloor, g.Threshold)
		gates = append(gates, g)
	}
	return gates
}

// stageName names stage i for the history: `stage 1 "canary"` (1-based).
func (c Campaign) stageName(i int) string {
	if n := c.Stages[i].Name; n != "" {
		return fmt.Sprintf("stage %d %q", i+1, n)
	}
	return fmt.Sprintf("stage %d", i+1)
}

func statsOutcome(s StageStats) string {
	return fmt.Sprintf("%d succeeded, %d failed, %d timed out of %d", s.Succeeded, s.Failed, s.TimedOut, s.Targets)
}

func formatPercent(r float64) string {
	return strconv.FormatFloat(roundMicro(r*100), 'f', -1, 64) + "%"
}

func countNoun(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return strconv.Itoa(n) + " " + noun + "s"
}
