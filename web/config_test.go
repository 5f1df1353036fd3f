package web

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/fleetd/fleetd/devconfig"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/brokertest"
	"github.com/fleetd/fleetd/web/client"
)

// TestConfigAPI: layers and a device's own layer are put, patched, read and
// deleted through the API and the client; the device's view shows the
// effective document with its version and sources; bad input gets a 4xx
// naming the field, unknown devices and layers a 404.
func TestConfigAPI(t *testing.T) {
	b := brokertest.Start(t, nil)
	ctx := context.Background()
	for _, n := range []fleet.NewDevice{{ID: "d1", Model: "gw-100", Tags: []string{"site=lyon"}}, {ID: "d2", Model: "gw-100"}} {
		if _, _, err := b.Service.Register(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	svc := devconfig.NewService(devconfig.NewStore(b.Pool, devconfig.Limits{}), b.Broker, b.Recorder, devconfig.Options{})
	s := New(Options{AdminToken: token})
	s.MountConfig(svc)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	api := client.New(srv.URL, token)

	ch, err := api.SetConfigLayer(ctx, "model:gw-100,tag:site=lyon", json.RawMessage(`{"keepalive_s":25}`))
	if err != nil || ch.Devices != 1 || ch.Layer.Scope.String() != "model:gw-100,tag:site=lyon" {
		t.Fatalf("put layer: %+v %v", ch, err)
	}
	if ch, err = api.PatchConfigLayer(ctx, "fleet", json.RawMessage(`{"keepalive_s":60,"log":"info"}`)); err != nil || ch.Devices != 2 {
		t.Fatalf("patch fleet layer: %+v %v", ch, err)
	}
	// The view resolves what is pending before it answers.
	v, err := api.DeviceConfig(ctx, "d1")
	if err != nil || string(devconfig.Encode(v.Desired.Config)) != `{"keepalive_s":25,"log":"info"}` || v.Desired.Version != 1 ||
		strings.Join(v.Desired.Sources, " ") != "fleet model:gw-100,tag:site=lyon" || v.Sync != devconfig.SyncUnreported || v.Diff == nil {
		t.Fatalf("d1: %+v %v", v, err)
	}
	if v, err = api.PatchDeviceConfig(ctx, "d1", json.RawMessage(`{"log":"debug"}`)); err != nil || v.Desired.Version != 2 ||
		v.Desired.Config["log"] != "debug" || string(devconfig.Encode(v.Device)) != `{"log":"debug"}` {
		t.Fatalf("patch d1: %+v %v", v, err)
	}
	if v, err = api.SetDeviceConfig(ctx, "d1", json.RawMessage("{\n  \"log\": \"warn\"\n}")); err != nil || v.Desired.Version != 3 || v.DeviceRevision != 2 {
		t.Fatalf("put d1: %+v %v", v, err)
	}
	ls, err := api.ConfigLayers(ctx)
	if err != nil || len(ls) != 2 || ls[0].Scope.String() != "fleet" {
		t.Fatalf("layers: %+v %v", ls, err)
	}
	if l, err := api.ConfigLayer(ctx, "fleet"); err != nil || l.Revision != 1 || l.Config["log"] != "info" {
		t.Fatalf("fleet layer: %+v %v", l, err)
	}

	req := func(method, path, body string) (int, map[string]any) {
		t.Helper()
		r, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		var out map[string]any
		_ = json.Unmarshal(raw, &out)
		return resp.StatusCode, out
	}
	for _, tt := range []struct {
		method, path, body string
		status             int
		field              string
	}{
		{"PUT", "/api/v1/devices/d1/config", `[1]`, 400, "config"},
		{"PUT", "/api/v1/devices/d1/config", ``, 400, "config"},
		{"PUT", "/api/v1/devices/d1/config", `{"a":`, 400, "config"},
		{"PUT", "/api/v1/devices/d1/config", `{"a":null}`, 400, "config"},
		{"PUT", "/api/v1/devices/d1/config", `{"a":"` + strings.Repeat("x", 17<<10) + `"}`, 400, "config"},
		{"PUT", "/api/v1/devices/d1/config", `{"a":"` + strings.Repeat("x", 300<<10) + `"}`, 400, "config"},
		{"PATCH", "/api/v1/devices/d1/config", `"x"`, 400, "config"},
		{"PUT", "/api/v1/config/layers/site=lyon", `{}`, 400, "scope"},
		{"PUT", "/api/v1/config/layers/model:gw%20100", `{}`, 400, "scope"},
		{"GET", "/api/v1/config/layers/bogus", ``, 400, "scope"},
		{"GET", "/api/v1/devices/nobody/config", ``, 404, ""},
		{"PUT", "/api/v1/devices/nobody/config", `{}`, 404, ""},
		{"GET", "/api/v1/config/layers/tag:site=paris", ``, 404, ""},
		{"DELETE", "/api/v1/config/layers/tag:site=paris", ``, 404, ""},
	} {
		status, body := req(tt.method, tt.path, tt.body)
		e, _ := body["error"].(map[string]any)
		if status != tt.status || (tt.field != "" && (e == nil || e["field"] != tt.field)) {
			t.Errorf("%s %s %.40s: %d %v, want %d naming %q", tt.method, tt.path, tt.body, status, body, tt.status, tt.field)
		}
	}
	if ch, err = api.DeleteConfigLayer(ctx, "model:gw-100,tag:site=lyon"); err != nil || ch.Devices != 1 || ch.Layer != nil {
		t.Fatalf("delete: %+v %v", ch, err)
	}
	if _, err := api.ConfigLayer(ctx, "model:gw-100,tag:site=lyon"); err == nil {
		t.Fatal("deleted layer still there")
	} else if ce := new(client.Error); !errors.As(err, &ce) || ce.Status != 404 {
		t.Fatalf("deleted layer: %v", err)
	}
	if v, err = api.DeviceConfig(ctx, "d1"); err != nil || v.Desired.Version != 4 || keepaliveText(v) != "60" {
		t.Fatalf("d1 after the delete: %+v %v", v, err)
	}
	if _, err := b.Service.Decommission(ctx, "d2"); err != nil {
		t.Fatal(err)
	}
	if status, _ := req("PUT", "/api/v1/devices/d2/config", `{}`); status != http.StatusConflict {
		t.Fatalf("decommissioned device: %d", status)
	}
}

func keepaliveText(v devconfig.View) string {
	b, _ := json.Marshal(v.Desired.Config["keepalive_s"])
	return string(b)
}
