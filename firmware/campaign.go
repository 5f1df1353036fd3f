package firmware

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// CampaignState is where a campaign is in its life.
type CampaignState string

// Campaign states. Aborted, Completed and RolledBack are terminal.
const (
	StateDraft   CampaignState = "draft"   // created, not started
	StateRunning CampaignState = "running" // dispatching the current stage, soaking or advancing
	StatePaused  CampaignState = "paused"  // by an operator or a gate
	// StateAwaitingApproval: the current stage requires an operator's
	// approval and has not had it; nothing of it is dispatched, gates are
	// still watched.
	StateAwaitingApproval CampaignState = "awaiting_approval"
	StateAborted          CampaignState = "aborted"      // terminal
	StateCompleted        CampaignState = "completed"    // terminal
	StateRollingBack      CampaignState = "rolling_back" // dispatching the previous firmware to devices it changed
	StateRolledBack       CampaignState = "rolled_back"  // terminal
)

// Gate actions: what a breached gate does to a running campaign.
const (
	GateActionPause = "pause" // the default; an operator resumes, aborts or rolls back
	GateActionAbort = "abort"
)

// Gate names, as they appear in GateResult.Gate and in campaign history.
const (
	GateFailureRate   = "failure_rate"
	GateNotBackOnline = "not_back_online"
	GateConnectivity  = "connectivity"
)

// MinConnectivityHours is how many device-hours the upgraded devices must
// have accumulated since their upgrade before the connectivity gate judges
// them. Right after the first devices come back, a rate in disconnects per
// device-hour is a division by almost nothing: a single disconnect in the
// first seconds reads as hundreds per hour and would pause every campaign
// that has a connectivity gate. 0.05 device-hours is three device-minutes
// (five canaries for 36 s, one device for 3 min): enough to keep the
// division meaningful, small enough that a device that really drops its
// connection over and over is caught within the first stage's soak. Beyond
// that the operator tunes sensitivity with the stage's ConnectivityRatio
// and Soak.
const MinConnectivityHours = 0.05

// connectivityFloor is the lowest fleet disconnect rate (per device-hour)
// the connectivity gate compares against. A fleet that did not disconnect at
// all in the window would otherwise make the upgraded devices' first
// disconnect an infinite ratio and a breach.
const connectivityFloor = 1.0

// Stage is one step of a staged rollout: which devices it covers and the
// health gates that must hold before the next stage starts.
type Stage struct {
	Name string `json:"name"`
	// Count is an absolute number of devices in this stage (e.g. canary 5) ...
	Count int `json:"count,omitempty"`
	// ... or Percent is the cumulative percent of the campaign's selected
	// devices reached at the end of this stage (10, 50, 100). Exactly one of
	// Count and Percent is set.
	Percent float64 `json:"percent,omitempty"`
	// Soak is how long to wait after every device of the stage finished,
	// gates still watched, before advancing. Zero advances at once.
	Soak Duration `json:"soak"`
	// MaxFailureRate (0..1): the stage breaches when (failed+timed out) /
	// stage targets can no longer stay at or under it.
	MaxFailureRate float64 `json:"max_failure_rate"`
	// MaxNotBackOnline is how many devices may fail to come back online on
	// the new version within the device timeout; above it breaches. -1 means
	// no limit.
	MaxNotBackOnline int `json:"max_not_back_online"`
	// ConnectivityRatio turns the connectivity gate on when > 0: the stage
	// breaches when the upgraded devices' disconnects per device-hour exceed
	// ratio × the untouched fleet's (floored at 1/device-hour), once they
	// have MinConnectivityHours of evidence.
	ConnectivityRatio float64 `json:"connectivity_ratio,omitempty"`
	// RequiresApproval holds the stage, once the previous one has soaked
	// and passed its gates, in awaiting_approval until an operator approves
	// it. A first stage with it waits after start.
	RequiresApproval bool `json:"requires_approval,omitempty"`
}

// Duration is a time.Duration that reads and writes JSON as a string ("30s")
// and also accepts a number of seconds (30, 1.5).
type Duration time.Duration

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// String formats the duration as time.Duration does ("1m30s").
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON writes the duration as a string such as "1m30s".
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON accepts a duration string ("30s", "2m") or a number of
// seconds. It returns an error naming the value otherwise.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("%q is not a duration (e.g. 30s, 2m)", s)
		}
		*d = Duration(v)
		return nil
	}
	n, err := strconv.ParseFloat(string(bytes.TrimSpace(b)), 64)
	if err != nil || math.IsNaN(n) || math.IsInf(n, 0) {
		return fmt.Errorf("%s is not a duration (e.g. \"30s\" or a number of seconds)", b)
	}
	*d = Duration(n * float64(time.Second))
	return nil
}

// Pacing limits how fast a campaign dispatches, so that it cannot cause a
// download or reconnect storm.
type Pacing struct {
	DevicesPerMinute int `json:"devices_per_minute"` // 0 = unlimited
	MaxConcurrent    int `json:"max_concurrent"`     // jobs dispatched and not finished at once; 0 = unlimited
}

// Campaign is a staged rollout of one firmware to a selection of devices.
type Campaign struct {
	ID            string   `json:"id"`
	Name          string   `json:"name"`
	FirmwareID    string   `json:"firmware_id"`
	Version       string   `json:"version"` // target version
	Stages        []Stage  `json:"stages"`
	Pacing        Pacing   `json:"pacing"`
	DeviceTimeout Duration `json:"device_timeout"` // from dispatch to back online on the target version
	GateAction    string   `json:"gate_action"`    // "pause" (default when empty) or "abort"
	Delta         bool     `json:"delta"`          // offer deltas (Spec.Delta)
	// Windows, when set, hold dispatch to the times one of them is open
	// in the device's zone: the value of its TimezoneTag tag when that
	// names a zone, else Timezone (UTC when empty). Soak, gates, timeouts
	// and rollback go on outside them.
	Windows     []Window      `json:"windows,omitempty"`
	Timezone    string        `json:"timezone,omitempty"`
	TimezoneTag string        `json:"timezone_tag,omitempty"`
	State       CampaignState `json:"state"`
	Stage       int           `json:"stage"` // index of the current stage
	// StageDoneAt is when every device of the current stage finished and
	// the soak started; nil while the stage is still running.
	StageDoneAt *time.Time `json:"stage_done_at,omitempty"`
	Total       int        `json:"total"` // devices selected for the whole campaign (fixed at start)
	// Follow makes the campaign follow the fleet: while it runs, devices
	// that start matching its selector later (registered since, or back on
	// an old version after it upgraded them) join its last stage.
	Follow bool `json:"follow"`
	// FollowingSince is when a following campaign's stages all passed and
	// it went on following, running in its last stage; nil before.
	FollowingSince *time.Time `json:"following_since,omitempty"`
	// Joined counts the devices a following campaign picked up after its
	// start (a device reflashed to an old version and upgraded again
	// counts each time it joins).
	Joined int `json:"joined"`
	// FollowLookedAt is when a following campaign last looked for devices
	// that start matching (the dispatcher's clock); nil before its first
	// look.
	FollowLookedAt *time.Time `json:"-"`
	// Approved is how many stages, from the first, an operator has let
	// start: stage i with RequiresApproval dispatches only when i < Approved
	// (an approval of stage i sets it to i+1). The zero value approves none.
	Approved int `json:"approved"`
	// PacedUntil is the pacing schedule: the time at which the next job is
	// due when jobs go out at exactly DevicesPerMinute. Start, resume and rollback set
	// it to the current time; each paced batch moves it on by one interval
	// per job. Zero means "now".
	PacedUntil time.Time `json:"-"`
}

// PacingCatchUp is how far a campaign's pacing schedule may lag behind the
// clock and still be caught up: a step that comes late (a slow database, a
// busy machine) sends the jobs it missed, up to this much time's worth, in
// one batch. Anything older is forgiven, not sent as a burst, which is also
// what keeps a campaign held by max_concurrent from storming once devices
// finish (their batches are capped by max_concurrent anyway). Campaigns must
// be stepped well within this (fleetd's -campaign-interval is at most 2 s)
// or pacing falls short of the rate.
const PacingCatchUp = 5 * time.Second

// StageStats is what the dispatcher counted for the current stage (and, for
// rollback, for the rollback jobs).
type StageStats struct {
	Targets   int // devices assigned to the current stage
	Pending   int // assigned, job not yet sent
	InFlight  int // job sent, not finished (dispatched, downloading, verifying, installing, rebooting)
	Succeeded int
	Failed    int
	TimedOut  int
	// NotBackOnline counts the finished devices that did not come back
	// online on the target version within the device timeout (typically a
	// subset of TimedOut).
	NotBackOnline int
	// UpgradedDisconnectsPerHour is the disconnects per device-hour of the
	// devices this campaign upgraded so far, counted from when each came
	// back online on the target version (the install reboot is not a
	// disconnect to hold against the firmware).
	UpgradedDisconnectsPerHour float64
	// FleetDisconnectsPerHour is the same rate for the devices the campaign
	// has not touched, over the same period.
	FleetDisconnectsPerHour float64
	// UpgradedDeviceHours is the evidence behind UpgradedDisconnectsPerHour.
	UpgradedDeviceHours float64
	// PendingByZone, for a campaign with windows, groups the pending
	// devices by the value of their timezone tag, earliest position first;
	// the devices beyond its first maxZoneGroups groups wait for a later
	// step. Nil for a campaign without windows.
	PendingByZone []ZonePending
}

// ZonePending is how many pending devices carry one value of the
// campaign's timezone tag ("" for none).
type ZonePending struct {
	Tag     string `json:"tag"`
	Pending int    `json:"pending"`
}

// Action is what the dispatcher does after a call to Next.
type Action string

// Actions. The dispatcher executes them; Next never changes the campaign.
const (
	ActionWait       Action = "wait"        // nothing to do now
	ActionDispatch   Action = "dispatch"    // send Decision.Dispatch more jobs of the current stage
	ActionSoak       Action = "soak"        // stage finished, soak starts: record StageDoneAt = now
	ActionAdvance    Action = "advance"     // go to the next stage (Stage+1, StageDoneAt=nil, assign its devices)
	ActionComplete   Action = "complete"    // last stage passed: state completed
	ActionFollow     Action = "follow"      // last stage passed, the campaign follows the fleet: record FollowingSince = now
	ActionPause      Action = "pause"       // a gate breached and GateAction is pause
	ActionAbort      Action = "abort"       // a gate breached and GateAction is abort
	ActionRolledBack Action = "rolled_back" // rolling back and every rollback job finished
	// ActionAwaitApproval: the current stage requires approval it has not
	// had; state awaiting_approval.
	ActionAwaitApproval Action = "await_approval"
)

// Decision is what Next decided, with the sentence to record in the
// campaign's history.
type Decision struct {
	Action   Action `json:"action"`
	Dispatch int    `json:"dispatch,omitempty"` // how many jobs to send now (ActionDispatch)
	// Zones, for a campaign with windows, are the zone groups
	// (ZonePending.Tag) whose window is open: ActionDispatch sends only
	// their devices' jobs. Nil for a campaign without windows (any device).
	Zones []string `json:"zones,omitempty"`
	// PacedUntil is the campaign's new pacing schedule after this batch
	// (ActionDispatch under devices_per_minute); the dispatcher stores it
	// with the batch.
	PacedUntil time.Time `json:"-"`
	// Gate is the breached gate for ActionPause/ActionAbort, and the
	// failure-rate gate's passing numbers for ActionAdvance/ActionComplete.
	Gate   *GateResult `json:"gate,omitempty"`
	Reason string      `json:"reason"` // one sentence for the campaign history
}

// GateResult is one health gate's verdict on the current stage.
type GateResult struct {
	Gate      string  `json:"gate"` // GateFailureRate, GateNotBackOnline or GateConnectivity
	Breached  bool    `json:"breached"`
	Value     float64 `json:"value"`
	Threshold float64 `json:"threshold"`
	Detail    string  `json:"detail"` // e.g. "2 of 5 devices failed (40%) > 20%"
}

// campaignInvalid builds the package's *ValidationError (declared with the
// package's sentinels in artifact.go) for a campaign field.
func campaignInvalid(field, format string, a ...any) error {
	return &ValidationError{Field: field, Msg: fmt.Sprintf(format, a...)}
}

// Normalize fills defaults: an empty GateAction becomes "pause". Validate
// does not mutate the campaign and accepts an empty GateAction, and Next
// treats an empty GateAction as pause, so calling Normalize only makes the
// stored value explicit.
func (c *Campaign) Normalize() {
	if c.GateAction == "" {
		c.GateAction = GateActionPause
	}
}

// Validate reports the first problem in the campaign definition as a
// *ValidationError naming the JSON field ("name", "firmware_id", "stages",
// "stages[1].percent", "stages[0].max_failure_rate",
// "pacing.devices_per_minute", "device_timeout", "gate_action",
// "windows[0].cron", "windows[0].duration", "timezone", "timezone_tag"). It
// checks only what an operator defines; ID, Version (resolved from the
// firmware), State, Stage, StageDoneAt and Total belong to the service.
//
// Each stage sets exactly one of count (> 0) and percent (0 < p <= 100).
// Percents are cumulative and must not decrease from one percent stage to
// the next. The last stage must reach 100 percent or be a count stage: a
// campaign whose last stage is a count (e.g. only "canary 5") deliberately
// upgrades that many devices and leaves the rest of the selection untouched,
// whereas a last percent stage below 100 is almost always a typo that would
// silently leave devices behind.
func (c Campaign) Validate() error {
	if strings.TrimSpace(c.Name) == "" {
		return campaignInvalid("name", "is required")
	}
	if strings.TrimSpace(c.FirmwareID) == "" {
		return campaignInvalid("firmware_id", "is required")
	}
	if len(c.Stages) == 0 {
		return campaignInvalid("stages", "at least one stage is required")
	}
	lastPercent, lastPercentIdx := 0.0, -1
	for i, s := range c.Stages {
		f := func(name string) string { return fmt.Sprintf("stages[%d]%s", i, name) }
		switch {
		case s.Count != 0 && s.Percent != 0:
			return campaignInvalid(f(""), "set count or percent, not both")
		case s.Count < 0:
			return campaignInvalid(f(".count"), "must be > 0, got %d", s.Count)
		case math.IsNaN(s.Percent) || s.Percent < 0 || s.Percent > 100:
			return campaignInvalid(f(".percent"), "must be in (0, 100], got %v", s.Percent)
		case s.Count == 0 && s.Percent == 0:
			return campaignInvalid(f(""), "set count (> 0) or percent (0 < p <= 100)")
		}
		if s.Percent > 0 {
			if s.Percent < lastPercent {
				return campaignInvalid(f(".percent"), "percent is cumulative and must not decrease: %v after %v in stages[%d]", s.Percent, lastPercent, lastPercentIdx)
			}
			lastPercent, lastPercentIdx = s.Percent, i
		}
		if s.Soak < 0 {
			return campaignInvalid(f(".soak"), "must be >= 0, got %s", s.Soak)
		}
		if math.IsNaN(s.MaxFailureRate) || s.MaxFailureRate < 0 || s.MaxFailureRate > 1 {
			return campaignInvalid(f(".max_failure_rate"), "must be in [0, 1], got %v", s.MaxFailureRate)
		}
		if s.MaxNotBackOnline < -1 {
			return campaignInvalid(f(".max_not_back_online"), "must be >= 0, or -1 for no limit, got %d", s.MaxNotBackOnline)
		}
		if math.IsNaN(s.ConnectivityRatio) || math.IsInf(s.ConnectivityRatio, 0) || s.ConnectivityRatio < 0 {
			return campaignInvalid(f(".connectivity_ratio"), "must be >= 0 (0 turns the gate off), got %v", s.ConnectivityRatio)
		}
	}
	last := len(c.Stages) - 1
	if p := c.Stages[last].Percent; p > 0 && p < 100 {
		return campaignInvalid(fmt.Sprintf("stages[%d].percent", last), "the last stage must reach 100 percent (or be a count stage), got %v", p)
	}
	if c.Follow && c.Stages[last].Percent == 0 {
		return campaignInvalid("follow", "a campaign that follows the fleet must end with a percent stage (its devices join the last stage); a last count stage leaves the rest of the selection untouched on purpose")
	}
	if c.Pacing.DevicesPerMinute < 0 {
		return campaignInvalid("pacing.devices_per_minute", "must be >= 0 (0 = unlimited), got %d", c.Pacing.DevicesPerMinute)
	}
	if c.Pacing.MaxConcurrent < 0 {
		return campaignInvalid("pacing.max_concurrent", "must be >= 0 (0 = unlimited), got %d", c.Pacing.MaxConcurrent)
	}
	if c.DeviceTimeout <= 0 {
		return campaignInvalid("device_timeout", "must be > 0, got %s", c.DeviceTimeout)
	}
	switch c.GateAction {
	case "", GateActionPause, GateActionAbort:
	default:
		return campaignInvalid("gate_action", "must be %q or %q, got %q", GateActionPause, GateActionAbort, c.GateAction)
	}
	return validateWindows(c.Windows, c.Timezone, c.TimezoneTag)
}

// FollowDue reports whether a following campaign looks for devices that
// start matching its selector now: only while it runs (a paused campaign
// looks again once resumed, from where it left off, so no device is
// missed), at most once every interval, counted from its last look.
func (c Campaign) FollowDue(now time.Time, every time.Duration) bool {
	if !c.Follow || c.State != StateRunning {
		return false
	}
	return c.FollowLookedAt == nil || !now.Before(c.FollowLookedAt.Add(every))
}

// roundMicro rounds x to a millionth so that float noise
// (100 × 0.29 = 28.999999999999996, 250 × 64.4 / 100 = 161.00000000000003)
// does not move a device across a rounding or gate boundary.
func roundMicro(x float64) float64 { return math.Round(x*1e6) / 1e6 }

// StageTargets returns how many devices stage i covers given the campaign
// total: a Count stage takes Count, capped at what earlier stages left; a
// Percent stage takes ceil(total × percent / 100) minus everything earlier
// stages assigned, never negative. Rounding up means a small percent of a
// small fleet still reaches at least one device. The result depends only on
// its arguments, so a restarted fleetd assigns the same numbers. An index
// outside stages returns 0.
func StageTargets(stages []Stage, total, i int) int {
	if i < 0 || i >= len(stages) || total <= 0 {
		return 0
	}
	assigned, n := 0, 0
	for j := 0; j <= i; j++ {
		s := stages[j]
		switch {
		case s.Count > 0:
			n = min(s.Count, total-assigned)
		case s.Percent > 0:
			reach := int(math.Ceil(roundMicro(float64(total) * s.Percent / 100)))
			n = min(reach, total) - assigned
		default:
			n = 0
		}
		n = max(n, 0)
		assigned += n
	}
	return n
}

// SelectDevices orders the campaign's candidate device ids by
// sha256(campaign id, NUL, device id), so that a restart picks the same
// devices for each stage (stage i takes the next StageTargets ids) and the
// canaries are spread across the fleet rather than the alphabetically first
// ids, which often share a batch, a site or a customer. A different campaign
// picks different canaries. The result does not depend on the order of ids;
// ids is not modified.
func SelectDevices(campaignID string, ids []string) []string {
	type keyed struct {
		sum [sha256.Size]byte
		id  string
	}
	ks := make([]keyed, len(ids))
	for i, id := range ids {
		ks[i] = keyed{sha256.Sum256([]byte(campaignID + "\x00" + id)), id}
	}
	slices.SortFunc(ks, func(a, b keyed) int {
		if c := bytes.Compare(a.sum[:], b.sum[:]); c != 0 {
			return c
		}
		return cmp.Compare(a.id, b.id)
	})
	out := make([]string, len(ks))
	for i, k := range ks {
		out[i] = k.id
	}
	return out
}
