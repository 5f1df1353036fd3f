package fix

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/fleetd/fleetd/fleet"
)

// fleetOf diagnoses from a table: id → problems; ids it lacks are unknown.
type fleetOf map[string][]fleet.Problem

func (f fleetOf) Diagnose(_ context.Context, id string) (fleet.Diagnosis, error) {
	ps, ok := f[id]
	if !ok {
		return fleet.Diagnosis{}, fmt.Errorf("device %s: %w", id, fleet.ErrNotFound)
	}
	d := fleet.Diagnosis{Device: fleet.Device{ID: id, State: fleet.StateActive}, Problems: ps}
	if strings.HasPrefix(id, "old") {
		d.Device.State = fleet.StateDecommissioned
	}
	return d, nil
}

func (f fleetOf) Candidates(_ context.Context, models, _ []string, _ bool) ([]fleet.Candidate, error) {
	var out []fleet.Candidate
	for id := range f {
		if strings.HasPrefix(id, models[0]) {
			out = append(out, fleet.Candidate{ID: id})
		}
	}
	return out, nil
}

// configs records the patches it applies; a device named broken fails.
type configs map[string]string

func (c configs) PatchDevice(_ context.Context, id string, patch json.RawMessage) (int64, error) {
	if id == "broken" {
		return 0, errors.New("database unreachable")
	}
	c[id] = string(patch)
	return int64(len(c)), nil
}

func TestApply(t *testing.T) {
	cut := fleet.Problem{Code: fleet.ProblemKeepaliveMismatch, Remedy: &fleet.Remedy{Config: map[string]any{fleet.ConfigKeepalive: 15}}}
	cleared := cut
	cleared.Cleared = "since 12:00 the device connects with a keepalive of 15 s"
	f := fleetOf{
		"nat-1": {cut}, "nat-2": {cut, {Code: fleet.ProblemFlapping}}, "ok-1": {}, "ok-2": {cleared},
		"old-1": {cut}, "broken": {cut},
	}
	cfg := configs{}
	s := NewService(f, cfg)
	res, err := s.Apply(context.Background(), Request{Problem: fleet.ProblemKeepaliveMismatch,
		Devices: []string{"nat-1", "nat-2", "nat-1", "ok-1", "ok-2", "old-1", "gone-1", "broken"}})
	if err != nil {
		t.Fatal(err)
	}
	patch := map[string]any{fleet.ConfigKeepalive: 15}
	want := Result{Problem: fleet.ProblemKeepaliveMismatch, Applied: 2, Skipped: 4, Failed: 1, Devices: []Outcome{
		{DeviceID: "nat-1", Applied: true, Config: patch, Version: 1},
		{DeviceID: "nat-2", Applied: true, Config: patch, Version: 2},
		{DeviceID: "ok-1", Skipped: "its diagnosis does not name keepalive_mismatch"},
		{DeviceID: "ok-2", Skipped: "cleared: " + cleared.Cleared},
		{DeviceID: "old-1", Skipped: "decommissioned"},
		{DeviceID: "gone-1", Skipped: "no such device"},
		{DeviceID: "broken", Error: "configuration: database unreachable"},
	}}
	if diff := cmp.Diff(want, res); diff != "" {
		t.Errorf("result (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(configs{"nat-1": `{"keepalive_s":15}`, "nat-2": `{"keepalive_s":15}`}, cfg); diff != "" {
		t.Errorf("patches applied (-want +got):\n%s", diff)
	}

	res, err = s.Apply(context.Background(), Request{Problem: fleet.ProblemKeepaliveMismatch, Selector: Selector{Models: []string{"nat"}}})
	if err != nil || res.Applied != 2 {
		t.Errorf("by selector: %+v, %v; want both nat devices fixed", res, err)
	}
}

func TestApplyRefuses(t *testing.T) {
	s := NewService(fleetOf{"nat-1": nil}, configs{})
	many := make([]string, MaxDevices+1)
	for i := range many {
		many[i] = fmt.Sprintf("d-%d", i)
	}
	for _, tt := range []struct {
		r     Request
		field string
	}{
		{Request{Problem: fleet.ProblemFlapping, Devices: []string{"nat-1"}}, "problem"},
		{Request{Problem: ""}, "problem"},
		{Request{Problem: fleet.ProblemKeepaliveMismatch}, "devices"},
		{Request{Problem: fleet.ProblemKeepaliveMismatch, Devices: []string{"a"}, Selector: Selector{Models: []string{"gw"}}}, "devices"},
		{Request{Problem: fleet.ProblemKeepaliveMismatch, Devices: many}, "devices"},
		{Request{Problem: fleet.ProblemKeepaliveMismatch, Devices: []string{"ok", "no spaces"}}, "devices[1]"},
		{Request{Problem: fleet.ProblemKeepaliveMismatch, Selector: Selector{Models: []string{"th"}}}, "selector"},
		{Request{Problem: fleet.ProblemKeepaliveMismatch, Selector: Selector{Models: []string{"nat", ""}}}, "selector.models[1]"},
		{Request{Problem: fleet.ProblemKeepaliveMismatch, Selector: Selector{Tags: []string{"site lyon"}}}, "selector.tags[0]"},
	} {
		_, err := s.Apply(context.Background(), tt.r)
		var ve *fleet.ValidationError
		if !errors.As(err, &ve) || ve.Field != tt.field {
			t.Errorf("%+v: %v; want a validation error naming %s", tt.r, err, tt.field)
		}
	}
}
