// Package fix applies what the diagnosis prescribes: a problem that names a
// configuration change (fleet.Problem.Remedy: a keepalive below an idle cut,
// or within the keepalive policy) is fixed by merging that change into the
// device's own desired configuration, for every device given or selected
// whose diagnosis names the problem now. The device gets the new document
// on devices/{id}/config/desired and applies it at its next connect; the
// diagnosis then reports the problem cleared once the device's sessions no
// longer show it (fleet.Problem.Cleared).
package fix

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/fleetd/fleetd/fleet"
)

// MaxDevices bounds the devices one request may fix: each is diagnosed (its
// last hour of events read) and its configuration changed in turn.
const MaxDevices = 1000

// Diagnoser is the diagnosis (fleet.Service).
type Diagnoser interface {
	Diagnose(ctx context.Context, id string) (fleet.Diagnosis, error)
	Candidates(ctx context.Context, models, tags []string, incompatibleOnly bool) ([]fleet.Candidate, error)
}

// Configurer merges a JSON merge patch into a device's own configuration
// layer and returns the device's new desired version. It returns an error
// wrapping ErrGone for a decommissioned device and one wrapping
// fleet.ErrNotFound for an unknown one.
type Configurer interface {
	PatchDevice(ctx context.Context, id string, patch json.RawMessage) (version int64, err error)
}

// ErrGone is what a Configurer wraps for a decommissioned device.
var ErrGone = errors.New("device decommissioned")

// Request is POST /api/v1/fixes: a problem code and the devices to fix,
// named or selected by model and tags (every tag).
type Request struct {
	Problem  string   `json:"problem"`
	Devices  []string `json:"devices,omitempty"`
	Selector Selector `json:"selector"`
}

// Selector chooses devices as a campaign's does, by model and tags.
type Selector struct {
	Models []string `json:"models,omitempty"`
	Tags   []string `json:"tags,omitempty"`
}

// Outcome is what became of one device.
type Outcome struct {
	DeviceID string `json:"device_id"`
	// Applied: its configuration now carries Config, in desired Version.
	Applied bool           `json:"applied"`
	Config  map[string]any `json:"config,omitempty"`
	Version int64          `json:"version,omitempty"`
	// Skipped says why nothing was changed: its diagnosis does not name the
	// problem (any more), the problem is cleared, the device is gone.
	Skipped string `json:"skipped,omitempty"`
	// Error is a failure to diagnose or configure it; the others are
	// still fixed.
	Error string `json:"error,omitempty"`
}

// Result is the answer: one outcome per device, in the order asked.
type Result struct {
	Problem string    `json:"problem"`
	Applied int       `json:"applied"`
	Skipped int       `json:"skipped"`
	Failed  int       `json:"failed"`
	Devices []Outcome `json:"devices"`
}

// Remediable are the problems whose diagnosis carries a Remedy.
var Remediable = []string{fleet.ProblemKeepaliveMismatch, fleet.ProblemKeepaliveAbovePolicy}

// Service applies fixes.
type Service struct {
	diag   Diagnoser
	config Configurer
}

// NewService returns a Service over the diagnosis and the configuration.
func NewService(d Diagnoser, c Configurer) *Service { return &Service{diag: d, config: c} }

// Apply fixes r.Problem on the devices r names or selects. It returns a
// *fleet.ValidationError naming the field for a request it refuses; a device
// that cannot be fixed is an outcome, not an error.
func (s *Service) Apply(ctx context.Context, r Request) (Result, error) {
	ids, err := s.devices(ctx, r)
	if err != nil {
		return Result{}, err
	}
	res := Result{Problem: r.Problem, Devices: make([]Outcome, 0, len(ids))}
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		o := s.fixOne(ctx, r.Problem, id)
		switch {
		case o.Applied:
			res.Applied++
		case o.Error != "":
			res.Failed++
		default:
			res.Skipped++
		}
		res.Devices = append(res.Devices, o)
	}
	return res, nil
}

func (s *Service) devices(ctx context.Context, r Request) ([]string, error) {
	if !slices.Contains(Remediable, r.Problem) {
		return nil, &fleet.ValidationError{Field: "problem", Msg: fmt.Sprintf("%q has no configuration fix; these do: %v", clip(r.Problem, 40), Remediable)}
	}
	selecting := len(r.Selector.Models) > 0 || len(r.Selector.Tags) > 0
	switch {
	case len(r.Devices) > 0 && selecting:
		return nil, &fleet.ValidationError{Field: "devices", Msg: "name devices or give a selector, not both"}
	case len(r.Devices) == 0 && !selecting:
		return nil, &fleet.ValidationError{Field: "devices", Msg: "name the devices to fix, or give a selector (models, tags)"}
	case len(r.Devices) > MaxDevices:
		return nil, &fleet.ValidationError{Field: "devices", Msg: fmt.Sprintf("names %d devices; at most %d per request", len(r.Devices), MaxDevices)}
	}
	if len(r.Devices) > 0 {
		seen := make(map[string]bool, len(r.Devices))
		ids := make([]string, 0, len(r.Devices))
		for i, id := range r.Devices {
			if err := fleet.ValidateID(id); err != nil {
				return nil, &fleet.ValidationError{Field: fmt.Sprintf("devices[%d]", i), Msg: err.(*fleet.ValidationError).Msg}
			}
			if !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
		return ids, nil
	}
	if len(r.Selector.Models) > 32 || len(r.Selector.Tags) > 32 {
		return nil, &fleet.ValidationError{Field: "selector", Msg: "names more than 32 models or tags"}
	}
	for i, m := range r.Selector.Models {
		if m == "" || len(m) > 64 || !utf8.ValidString(m) {
			return nil, &fleet.ValidationError{Field: fmt.Sprintf("selector.models[%d]", i), Msg: "must be a model name of 1 to 64 bytes"}
		}
	}
	for i, tag := range r.Selector.Tags {
		if tag == "" || len(tag) > 128 || !utf8.ValidString(tag) || strings.ContainsAny(tag, " \t\r\n") {
			return nil, &fleet.ValidationError{Field: fmt.Sprintf("selector.tags[%d]", i), Msg: "must be a tag of 1 to 128 bytes without spaces (e.g. site=lyon)"}
		}
	}
	cands, err := s.diag.Candidates(ctx, r.Selector.Models, r.Selector.Tags, false)
	if err != nil {
		return nil, err
	}
	if len(cands) == 0 {
		return nil, &fleet.ValidationError{Field: "selector", Msg: "matches no active device"}
	}
	if len(cands) > MaxDevices {
		return nil, &fleet.ValidationError{Field: "selector", Msg: fmt.Sprintf("matches %d devices; at most %d per request: narrow it by model or tag", len(cands), MaxDevices)}
	}
	ids := make([]string, len(cands))
	for i, c := range cands {
		ids[i] = c.ID
	}
	return ids, nil
}

func (s *Service) fixOne(ctx context.Context, problem, id string) Outcome {
	o := Outcome{DeviceID: id}
	d, err := s.diag.Diagnose(ctx, id)
	switch {
	case errors.Is(err, fleet.ErrNotFound):
		o.Skipped = "no such device"
		return o
	case err != nil:
		o.Error = "diagnosis: " + err.Error()
		return o
	case d.Device.State == fleet.StateDecommissioned:
		o.Skipped = "decommissioned"
		return o
	}
	i := slices.IndexFunc(d.Problems, func(p fleet.Problem) bool { return p.Code == problem })
	if i < 0 {
		o.Skipped = "its diagnosis does not name " + problem
		return o
	}
	pr := d.Problems[i]
	switch {
	case pr.Cleared != "":
		o.Skipped = "cleared: " + pr.Cleared
		return o
	case pr.Remedy == nil || len(pr.Remedy.Config) == 0:
		o.Skipped = "its diagnosis names no configuration change"
		return o
	}
	patch, _ := json.Marshal(pr.Remedy.Config)
	v, err := s.config.PatchDevice(ctx, id, patch)
	switch {
	case errors.Is(err, ErrGone):
		o.Skipped = "decommissioned"
	case errors.Is(err, fleet.ErrNotFound):
		o.Skipped = "no such device"
	case err != nil:
		o.Error = "configuration: " + err.Error()
	default:
		o.Applied, o.Config, o.Version = true, pr.Remedy.Config, v
	}
	return o
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
