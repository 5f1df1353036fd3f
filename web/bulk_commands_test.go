package web

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/web/client"
)

// TestBulkCommandAPI: every field of a bulk request is validated with a 4xx
// naming it; a bulk is created, listed, summarised, its devices listed page
// by page and filtered by state, cancelled once (409 the second time); the
// cap on running bulks gives 429 and unknown ids 404.
func TestBulkCommandAPI(t *testing.T) {
	pool := pgtest.New(t)
	h, _ := fleet.NewHasher(bytes.Repeat([]byte("k"), 32))
	devices := fleet.NewService(fleet.NewStore(pool), h, nil)
	ctx := context.Background()
	for i := range 5 {
		if _, _, err := devices.Register(ctx, fleet.NewDevice{ID: fmt.Sprintf("d%d", i), Model: "gw-100", Tags: []string{"site=lyon"}}); err != nil {
			t.Fatal(err)
		}
	}
	svc := command.NewService(command.NewStore(pool), &fakeSender{}, nopEvents{}, command.Options{})
	bulks := command.NewBulks(svc, devices, command.BulkOptions{MaxDevices: 4, MaxRunning: 1})
	s := New(Options{AdminToken: token})
	s.MountBulkCommands(bulks)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	api := client.New(srv.URL, token)

	call := func(method, path, body string) (int, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out map[string]any
		json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out
	}
	sel := `"selector":{"tags":["site=lyon"],"models":["gw-100"]}`
	for _, tt := range []struct {
		body, field string
	}{
		{`{` + sel + `}`, "name"},
		{`{"name":"Reboot",` + sel + `}`, "name"},
		{`{"name":"ping"}`, "selector"},
		{`{"name":"ping","selector":{}}`, "selector"},
		{`{"name":"ping","selector":{"all":true,"models":["gw-100"]}}`, "selector.all"},
		{`{"name":"ping","selector":{"version":"not a range"}}`, "selector.version"},
		{`{"name":"ping","selector":{"compat":"maybe"}}`, "selector.compat"},
		{`{"name":"ping","selector":{"models":"gw-100"}}`, "selector.models"},
		{`{"name":"ping","selector":{"tags":[""]}}`, "selector.tags[0]"},
		{`{"name":"ping","selector":{"colour":"red"}}`, "colour"},
		{`{"name":"ping","selector":{"models":["ap-7"]}}`, "selector"},    // matches nothing
		{`{"name":"ping","selector":{"tags":["site=lyon"]}}`, "selector"}, // 5 devices, cap 4
		{`{"name":"ping",` + sel + `,"pacing":{"max_concurrent":-1}}`, "pacing.max_concurrent"},
		{`{"name":"ping",` + sel + `,"pacing":{"devices_per_minute":-1}}`, "pacing.devices_per_minute"},
		{`{"name":"ping",` + sel + `,"pacing":{"max_concurrent":"ten"}}`, "pacing.max_concurrent"},
		{`{"name":"ping",` + sel + `,"timeout":"soon"}`, "timeout"},
		{`{"name":"ping",` + sel + `,"expires_in":"72h"}`, "expires_in"},
		{`{"name":"ping",` + sel + `,"params":[1]}`, "params"},
		{`not json`, "body"},
	} {
		status, out := call(http.MethodPost, "/api/v1/commands", tt.body)
		e, _ := out["error"].(map[string]any)
		if status != http.StatusBadRequest || e["field"] != tt.field {
			t.Errorf("%s: %d %v, want 400 naming %s", tt.body, status, out, tt.field)
		}
	}
	for _, path := range []string{"/api/v1/commands?limit=0x", "/api/v1/commands?limit=1000", "/api/v1/commands?cursor=zz",
		"/api/v1/commands/bulk_x/devices?state=bogus", "/api/v1/commands/bulk_x/devices?cursor=%25"} {
		if status, out := call(http.MethodGet, path, ""); status != http.StatusBadRequest {
			t.Errorf("GET %s: %d %v, want 400", path, status, out)
		}
	}

	if _, _, err := devices.Register(ctx, fleet.NewDevice{ID: "other", Model: "ap-7"}); err != nil {
		t.Fatal(err)
	}
	b, err := api.SendBulk(ctx, command.BulkRequest{Request: command.Request{Name: "reboot", Params: json.RawMessage(`{"delay_s": 5}`)},
		Selector: command.Selector{Models: []string{"gw-100"}, Tags: []string{"site=lyon"}, Version: "*"}, Pacing: command.Pacing{MaxConcurrent: 2}})
	if err == nil || !strings.Contains(err.Error(), "400") {
		t.Fatalf("a version constraint excludes devices without a version (none has reported one): %+v %v", b, err)
	}
	b, err = api.SendBulk(ctx, command.BulkRequest{Request: command.Request{Name: "reboot", Params: json.RawMessage(`{"delay_s": 5}`)},
		Selector: command.Selector{Models: []string{"ap-7"}}, Pacing: command.Pacing{MaxConcurrent: 2}})
	if err != nil || b.State != command.BulkRunning || b.Total != 1 || b.Counts.Pending != 1 || string(b.Params) != `{"delay_s":5}` {
		t.Fatalf("created %+v %v", b, err)
	}
	if _, err := api.SendBulk(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: command.Selector{Models: []string{"ap-7"}}}); err == nil || !strings.Contains(err.Error(), "429") {
		t.Fatalf("second running bulk past a cap of 1: %v", err)
	}
	bulks.Step(ctx)
	got, err := api.Bulk(ctx, b.ID)
	if err != nil || got.Counts.Queued != 1 || got.Counts.Pending != 0 {
		t.Fatalf("after a step: %+v %v", got, err)
	}
	page, err := api.BulkDevices(ctx, b.ID, "queued", "", 0)
	if err != nil || len(page.Devices) != 1 || page.Devices[0].DeviceID != "other" || page.Devices[0].CommandID == "" {
		t.Fatalf("queued devices: %+v %v", page, err)
	}
	if page, err := api.BulkDevices(ctx, b.ID, "succeeded", "", 0); err != nil || len(page.Devices) != 0 {
		t.Fatalf("succeeded devices: %+v %v", page, err)
	}
	list, err := api.Bulks(ctx, "", 0)
	if err != nil || len(list.Bulks) != 1 || list.Bulks[0].ID != b.ID {
		t.Fatalf("list: %+v %v", list, err)
	}
	c, err := api.CancelBulk(ctx, b.ID)
	if err != nil || c.State != command.BulkCancelled || c.Counts.Expired != 1 || c.Counts.Sum() != c.Total {
		t.Fatalf("cancelled: %+v %v", c, err)
	}
	if status, out := call(http.MethodPost, "/api/v1/commands/"+b.ID+"/cancel", ""); status != http.StatusConflict {
		t.Fatalf("second cancel: %d %v, want 409", status, out)
	}
	for _, path := range []string{"/api/v1/commands/bulk_nope", "/api/v1/commands/bulk_nope/devices"} {
		if status, _ := call(http.MethodGet, path, ""); status != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404", path, status)
		}
	}
	if status, _ := call(http.MethodPost, "/api/v1/commands/bulk_nope/cancel", ""); status != http.StatusNotFound {
		t.Errorf("cancel unknown: %d, want 404", status)
	}
}

// TestStaleBulkProgressIsDropped: once a bulk ended, a "running" change of
// it (another replica's progress, brought late by the bus) is not
// published; other bulks and the end itself are; the memory is bounded.
func TestStaleBulkProgressIsDropped(t *testing.T) {
	var e endedBulks
	for i, c := range []struct {
		id    string
		ended bool
		want  bool
	}{
		{"b1", false, true}, {"b1", true, true}, {"b1", false, false}, {"b1", true, true}, {"b2", false, true},
	} {
		if got := e.note(c.id, c.ended); got != c.want {
			t.Fatalf("change %d (%s ended=%v): published %v, want %v", i, c.id, c.ended, got, c.want)
		}
	}
	for i := range maxEndedBulks + 10 {
		e.note(fmt.Sprint("x", i), true)
	}
	if len(e.ids) != maxEndedBulks || len(e.order) != maxEndedBulks || e.ids["b1"] {
		t.Fatalf("%d ids, %d in order, b1 remembered %v: want %d, the oldest forgotten", len(e.ids), len(e.order), e.ids["b1"], maxEndedBulks)
	}
}
