package command

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/Masterminds/semver/v3"
)

// BulkState is where a bulk command is in its life.
type BulkState string

// Bulk states. Running sends and waits; completed and cancelled are final.
const (
	BulkRunning   BulkState = "running"   // sending, or waiting for answers
	BulkCompleted BulkState = "completed" // every device's command finished (or was skipped)
	BulkCancelled BulkState = "cancelled" // an operator stopped it: nothing more is sent
)

// Target states of a bulk's device that has no command (yet): pending
// (not sent yet), skipped (never sent: decommissioned, or as many pending
// commands as it may have), cancelled (not sent before the bulk was
// cancelled), pruned (sent; its command was pruned by retention).
const (
	TargetPending   = "pending"
	TargetSkipped   = "skipped"
	TargetCancelled = "cancelled"
	TargetPruned    = "pruned"
)

// TargetStates are the states the per-device listing can filter on.
var TargetStates = []string{TargetPending, string(StateQueued), string(StateDelivered), string(StateSucceeded), string(StateFailed),
	string(StateTimedOut), string(StateExpired), TargetSkipped, TargetCancelled, TargetPruned}

// Selector chooses a bulk's devices among the active ones, with the fields
// of a campaign's selector (firmware.Selector): every field given must
// match. All must be set to select the whole fleet, so that an empty
// selector is a mistake, not a broadcast.
type Selector struct {
	Models []string `json:"models,omitempty"`
	// Version is a semver constraint on the devices' firmware ("<2.0.0");
	// a device whose firmware is not a version does not match it.
	Version string   `json:"version,omitempty"`
	Tags    []string `json:"tags,omitempty"`
	// Compat "incompatible" selects the devices fleetd found incompatible.
	Compat string `json:"compat,omitempty"`
	All    bool   `json:"all,omitempty"`
}

// Pacing limits how fast a bulk sends, as a campaign's pacing does.
type Pacing struct {
	// MaxConcurrent is how many of its commands may be in flight (queued
	// or delivered, not finished) at once [DefaultMaxConcurrent]. A device
	// that is offline holds its slot until its command expires.
	MaxConcurrent int `json:"max_concurrent"`
	// DevicesPerMinute is the rate commands are created at; 0 = no rate
	// limit (MaxConcurrent alone paces).
	DevicesPerMinute int `json:"devices_per_minute"`
}

// Pacing bounds.
const (
	DefaultMaxConcurrent = 100
	MaxMaxConcurrent     = 10000
	MaxDevicesPerMinute  = 600000
)

// BulkRequest is what an operator asks for (POST /api/v1/commands).
type BulkRequest struct {
	Request
	Selector Selector `json:"selector"`
	Pacing   Pacing   `json:"pacing"`
}

// Counts are a bulk's devices by state; they add up to its total.
type Counts struct {
	Pending   int `json:"pending"`
	Queued    int `json:"queued"`
	Delivered int `json:"delivered"`
	Succeeded int `json:"succeeded"`
	Failed    int `json:"failed"`
	TimedOut  int `json:"timed_out"`
	Expired   int `json:"expired"`
	Skipped   int `json:"skipped"`
	Cancelled int `json:"cancelled"`
}

// InFlight is how many commands are sent and not finished.
func (c Counts) InFlight() int { return c.Queued + c.Delivered }

// Sum is the number of devices the counts cover.
func (c Counts) Sum() int {
	return c.Pending + c.Queued + c.Delivered + c.Succeeded + c.Failed + c.TimedOut + c.Expired + c.Skipped + c.Cancelled
}

// Bulk is a bulk command and its summary.
type Bulk struct {
	ID        string          `json:"id"`
	Name      string          `json:"name"`
	Params    json.RawMessage `json:"params"`
	Timeout   Duration        `json:"timeout"`
	ExpiresIn Duration        `json:"expires_in"`
	Selector  Selector        `json:"selector"`
	Pacing    Pacing          `json:"pacing"`
	State     BulkState       `json:"state"`
	// Total is how many devices the selector matched at creation.
	Total      int        `json:"total"`
	Counts     Counts     `json:"counts"`
	CreatedAt  time.Time  `json:"created_at"`
	FinishedAt *time.Time `json:"finished_at"`
	// UpdatedAt is when it last sent a batch, completed or was cancelled;
	// answers change Counts, not this.
	UpdatedAt  time.Time `json:"updated_at"`
	Next       int       `json:"-"` // targets below it have been sent or skipped
	PacedUntil time.Time `json:"-"`
}

// BulkTarget is one device of a bulk and what became of its command.
type BulkTarget struct {
	DeviceID    string          `json:"device_id"`
	CommandID   string          `json:"command_id,omitempty"`
	State       string          `json:"state"`
	Skipped     string          `json:"skipped,omitempty"`
	Result      json.RawMessage `json:"result,omitempty"`
	SentAt      *time.Time      `json:"sent_at"` // its command's creation: from then on it is in flight
	DeliveredAt *time.Time      `json:"delivered_at"`
	FinishedAt  *time.Time      `json:"finished_at"`
	Position    int             `json:"-"`
}

// ErrTooManyBulks: as many bulks are running as may.
var ErrTooManyBulks = errors.New("too many running bulk commands")

// ErrFinished: the bulk is not running any more (cancel).
var ErrFinished = errors.New("bulk command finished")

// maxSelectorItems bounds the models and tags of a selector.
const maxSelectorItems = 32

// Normalize checks a bulk request and fills in defaults, like
// Request.Normalize for the command and these for the rest: a selector
// that names something (or All), a version that is a semver constraint, a
// compat that is "incompatible" or empty, pacing within bounds. It returns
// a *ValidationError naming the field ("selector.version", "pacing.max_concurrent").
func (r BulkRequest) Normalize(l Limits) (BulkRequest, error) {
	req, err := r.Request.Normalize(l)
	if err != nil {
		return r, err
	}
	r.Request = req
	s := r.Selector
	if len(s.Models) > maxSelectorItems {
		return r, invalid("selector.models", "holds more than %d models", maxSelectorItems)
	}
	for i, m := range s.Models {
		if m == "" || len(m) > 64 || !utf8.ValidString(m) {
			return r, invalid(fmt.Sprintf("selector.models[%d]", i), "must be a model name of 1 to 64 bytes")
		}
	}
	if len(s.Tags) > maxSelectorItems {
		return r, invalid("selector.tags", "holds more than %d tags", maxSelectorItems)
	}
	for i, t := range s.Tags {
		if t == "" || len(t) > 128 || !utf8.ValidString(t) || strings.ContainsAny(t, " \t\r\n") {
			return r, invalid(fmt.Sprintf("selector.tags[%d]", i), "must be a tag of 1 to 128 bytes without spaces (e.g. site=lyon)")
		}
	}
	if s.Version != "" {
		if len(s.Version) > 100 {
			return r, invalid("selector.version", "is longer than 100 bytes")
		}
		if _, err := semver.NewConstraint(s.Version); err != nil {
			return r, invalid("selector.version", "is not a semver constraint (e.g. <2.0.0): %v", err)
		}
	}
	if s.Compat != "" && s.Compat != "incompatible" {
		return r, invalid("selector.compat", "must be incompatible or empty")
	}
	named := len(s.Models) > 0 || len(s.Tags) > 0 || s.Version != "" || s.Compat != ""
	switch {
	case !named && !s.All:
		return r, invalid("selector", "names no models, version, tags or compat; set all to send to every active device")
	case named && s.All:
		return r, invalid("selector.all", "cannot be combined with models, version, tags or compat")
	}
	p := &r.Pacing
	if p.MaxConcurrent == 0 {
		p.MaxConcurrent = DefaultMaxConcurrent
	}
	if p.MaxConcurrent < 0 || p.MaxConcurrent > MaxMaxConcurrent {
		return r, invalid("pacing.max_concurrent", "must be from 1 to %d (0 = %d), got %d", MaxMaxConcurrent, DefaultMaxConcurrent, p.MaxConcurrent)
	}
	if p.DevicesPerMinute < 0 || p.DevicesPerMinute > MaxDevicesPerMinute {
		return r, invalid("pacing.devices_per_minute", "must be from 0 (no rate limit) to %d, got %d", MaxDevicesPerMinute, p.DevicesPerMinute)
	}
	return r, nil
}

// matches reports whether a device's firmware meets the selector's version
// constraint (the other fields are matched by the database).
func (s Selector) matches(c *semver.Constraints, firmware string) bool {
	if c == nil {
		return true
	}
	v, err := semver.NewVersion(firmware)
	return err == nil && c.Check(v)
}

// PacingCatchUp is how far a bulk's pacing schedule may lag behind the
// clock and still be caught up in one batch (firmware.PacingCatchUp's rule).
const PacingCatchUp = 5 * time.Second

// BulkDecision is what the pacer does with a running bulk now.
type BulkDecision struct {
	// Send is how many more devices get their command now.
	Send int
	// PacedUntil is the pacing schedule after them (zero without a rate).
	PacedUntil time.Time
	// Complete: nothing is pending or in flight; the bulk is completed.
	Complete bool
	Reason   string
}

// Decide sizes a running bulk's next batch. It is pure: the pacer executes
// it. The budget is what is pending, capped by MaxConcurrent minus what is
// in flight (queued or delivered) and, with DevicesPerMinute, by the
// schedule: commands are due one interval (a minute / DevicesPerMinute)
// apart from PacedUntil, moved up to now − PacingCatchUp if it lags further,
// and every one due by now may go. With nothing pending and nothing in
// flight the bulk is complete. A bulk that is not running does nothing.
func (b Bulk) Decide(now time.Time) BulkDecision {
	if b.State != BulkRunning {
		return BulkDecision{Reason: "bulk is " + string(b.State)}
	}
	c := b.Counts
	if c.Pending <= 0 {
		if c.InFlight() > 0 {
			return BulkDecision{Reason: fmt.Sprintf("all sent; waiting for %d in flight", c.InFlight())}
		}
		return BulkDecision{Complete: true, Reason: "every device's command finished"}
	}
	budget := c.Pending
	reason := ""
	if free := b.Pacing.MaxConcurrent - c.InFlight(); free < budget {
		budget = free
		reason = fmt.Sprintf("%d in flight of max_concurrent %d", c.InFlight(), b.Pacing.MaxConcurrent)
	}
	var d BulkDecision
	if p := b.Pacing.DevicesPerMinute; p > 0 {
		interval := time.Minute / time.Duration(p)
		due := b.PacedUntil
		if floor := now.Add(-PacingCatchUp); due.IsZero() {
			due = now
		} else if due.Before(floor) {
			due = floor
		}
		ready := 0
		if !due.After(now) {
			ready = int(now.Sub(due)/interval) + 1
		}
		if ready < budget {
			budget = ready
			reason = fmt.Sprintf("devices_per_minute %d, %d due now", p, ready)
		}
		if budget > 0 {
			d.PacedUntil = due.Add(time.Duration(budget) * interval)
		}
	}
	if budget <= 0 {
		return BulkDecision{Reason: "pacing: " + reason}
	}
	d.Send = budget
	d.Reason = fmt.Sprintf("sending %d of %d pending", budget, c.Pending)
	if reason != "" {
		d.Reason += " (pacing: " + reason + ")"
	}
	return d
}
