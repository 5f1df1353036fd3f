package web

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/web/client"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func newAPI(t *testing.T) (*client.Client, *httptest.Server, *fleet.Store) {
	t.Helper()
	h, _ := fleet.NewHasher(bytes.Repeat([]byte("k"), 32))
	store := fleet.NewStore(pgtest.New(t))
	svc := fleet.NewService(store, h, nil)
	s := New(Options{AdminToken: token})
	s.MountDevices(svc)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return client.New(srv.URL, token), srv, store
}

func wantAPIError(t *testing.T, err error, status int, field string) {
	t.Helper()
	var e *client.Error
	if !errors.As(err, &e) {
		t.Fatalf("got %v, want an API error %d", err, status)
	}
	if e.Status != status || e.Field != field {
		t.Fatalf("got %d field %q (%s), want %d field %q", e.Status, e.Field, e.Message, status, field)
	}
}

func TestDeviceAPI(t *testing.T) {
	api, srv, _ := newAPI(t)
	ctx := context.Background()

	reg, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "gw-1", Model: "gw-100", Tags: []string{"site=lyon"}})
	if err != nil {
		t.Fatal(err)
	}
	if reg.Token == "" || reg.Device.ID != "gw-1" || reg.Device.State != "active" {
		t.Fatalf("registration: %+v", reg)
	}
	_, err = api.RegisterDevice(ctx, fleet.NewDevice{ID: "gw-1"})
	wantAPIError(t, err, http.StatusConflict, "")
	_, err = api.RegisterDevice(ctx, fleet.NewDevice{ID: "bad/id"})
	wantAPIError(t, err, http.StatusBadRequest, "id")
	_, err = api.RegisterDevice(ctx, fleet.NewDevice{ID: "ok", Tags: []string{"x", ""}})
	wantAPIError(t, err, http.StatusBadRequest, "tags[1]")
	_, err = api.Device(ctx, "nobody")
	wantAPIError(t, err, http.StatusNotFound, "")
	_, err = api.UpdateDevice(ctx, "gw-1", fleet.Patch{})
	wantAPIError(t, err, http.StatusBadRequest, "body")
	model := "gw-200"
	d, err := api.UpdateDevice(ctx, "gw-1", fleet.Patch{Model: &model})
	if err != nil || d.Model != "gw-200" || len(d.Tags) != 1 {
		t.Fatalf("patch model: %+v %v", d, err)
	}
	if _, err := api.RotateToken(ctx, "nobody"); err == nil {
		t.Fatal("rotated the token of an unknown device")
	}

	for _, tc := range []struct {
		q     client.DeviceQuery
		field string
	}{
		{client.DeviceQuery{Status: "asleep"}, "status"},
		{client.DeviceQuery{Protocol: "9"}, "protocol"},
		{client.DeviceQuery{State: "gone"}, "state"},
		{client.DeviceQuery{Limit: 5000}, "limit"},
	} {
		_, err := api.Devices(ctx, tc.q)
		wantAPIError(t, err, http.StatusBadRequest, tc.field)
	}
	_, err = api.Events(ctx, "gw-1", "not-a-cursor", 10)
	wantAPIError(t, err, http.StatusBadRequest, "cursor")

	// Raw bodies the typed client cannot produce.
	for _, tc := range []struct {
		body, field string
	}{
		{`{"id":"x","colour":"red"}`, "colour"},
		{`{"id":42}`, "id"},
		{`{"id":"x"`, "body"},
		{``, "body"},
		{`{"id":"x"}{"id":"y"}`, "body"},
	} {
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/api/v1/devices", bytes.NewBufferString(tc.body))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var body struct{ Error apiError }
		json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || body.Error.Field != tc.field {
			t.Errorf("body %q: %d field %q, want 400 field %q", tc.body, resp.StatusCode, body.Error.Field, tc.field)
		}
	}

	// Nothing half-written: the failed registrations left no rows.
	page, err := api.Devices(ctx, client.DeviceQuery{State: "all"})
	if err != nil || len(page.Devices) != 1 {
		t.Fatalf("devices after bad requests: %+v %v", page.Devices, err)
	}

	if _, err := api.Decommission(ctx, "gw-1"); err != nil {
		t.Fatal(err)
	}
	_, err = api.Decommission(ctx, "gw-1")
	wantAPIError(t, err, http.StatusNotFound, "")
	if page, _ := api.Devices(ctx, client.DeviceQuery{}); len(page.Devices) != 0 {
		t.Fatalf("decommissioned device listed as active: %+v", page.Devices)
	}
	if page, _ := api.Devices(ctx, client.DeviceQuery{State: "decommissioned"}); len(page.Devices) != 1 {
		t.Fatalf("decommissioned device not listed with state=decommissioned")
	}
}

func TestDeviceListAndEventPaging(t *testing.T) {
	api, _, store := newAPI(t)
	ctx := context.Background()
	for i := range 7 {
		if _, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: fmt.Sprintf("d%02d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	var ids []string
	cursor := ""
	for pages := 0; ; pages++ {
		page, err := api.Devices(ctx, client.DeviceQuery{Limit: 3, Cursor: cursor})
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range page.Devices {
			ids = append(ids, d.ID)
		}
		if page.NextCursor == "" {
			break
		}
		cursor = page.NextCursor
		if pages > 5 {
			t.Fatal("paging does not end")
		}
	}
	if fmt.Sprint(ids) != "[d00 d01 d02 d03 d04 d05 d06]" {
		t.Fatalf("paged ids: %v", ids)
	}

	// Events: 5 refusals recorded for d00, read back two at a time.
	rec, err := fleet.NewRecorder(store, fleet.RecorderOptions{SpoolPath: t.TempDir() + "/spool", FlushInterval: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	for i := range 5 {
		at = at.Add(time.Millisecond)
		rec.Record(fleet.Event{ID: fleet.NewEventID(at), DeviceID: "d00", At: at, Kind: fleet.KindRefused, Reason: fleet.ReasonAuthFailed, Detail: fmt.Sprint(i)})
	}
	rec.Close(ctx)
	var details []string
	cursor = ""
	for {
		page, err := api.Events(ctx, "d00", cursor, 2)
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range page.Events {
			details = append(details, ev.Detail)
		}
		if page.NextCursor == "" {
			break
		}
		cursor = page.NextCursor
	}
	if fmt.Sprint(details) != "[4 3 2 1 0]" {
		t.Fatalf("events newest first across pages: %v", details)
	}
}

func TestDiagnosisAPI(t *testing.T) {
	h, _ := fleet.NewHasher(bytes.Repeat([]byte("k"), 32))
	svc := fleet.NewService(fleet.NewStore(pgtest.New(t)), h, nil)
	ctx := context.Background()
	if err := svc.LoadPolicy(ctx); err != nil {
		t.Fatal(err)
	}
	s := New(Options{AdminToken: token})
	s.MountDevices(svc)
	s.MountDiagnosis(svc)
	srv := httptest.NewServer(s)
	defer srv.Close()
	api := client.New(srv.URL, token)

	p := fleet.Policy{Models: map[string]fleet.ModelRules{"gw-100": {MinFirmware: "1.1.0"}}, Keepalive: fleet.KeepalivePolicy{MaxSeconds: 30}}
	if _, err := api.SetPolicy(ctx, p); err != nil {
		t.Fatal(err)
	}
	got, err := api.Policy(ctx)
	if err != nil || got.Models["gw-100"].MinFirmware != "1.1.0" || got.Keepalive.MaxSeconds != 30 {
		t.Fatalf("policy round trip: %+v %v", got, err)
	}
	_, err = api.SetPolicy(ctx, fleet.Policy{Models: map[string]fleet.ModelRules{"gw-100": {Firmware: []fleet.FirmwareRange{{Versions: "~>nonsense"}}}}})
	wantAPIError(t, err, http.StatusBadRequest, "models.gw-100.firmware[0].versions")

	if _, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "d1", Model: "gw-100"}); err != nil {
		t.Fatal(err)
	}
	d, err := api.Diagnosis(ctx, "d1")
	if err != nil || d.Device.ID != "d1" || d.Problems == nil || d.Incompatibilities == nil {
		t.Fatalf("diagnosis: %+v %v", d, err)
	}
	_, err = api.Diagnosis(ctx, "nobody")
	wantAPIError(t, err, http.StatusNotFound, "")

	if err := api.DecideVerdict(ctx, "gw-100", "1.0.3", "confirmed"); err != nil {
		t.Fatal(err)
	}
	err = api.DecideVerdict(ctx, "gw-100", "1.0.3", "perhaps")
	wantAPIError(t, err, http.StatusBadRequest, "decision")
	vs, err := api.Verdicts(ctx)
	if err != nil || len(vs) != 1 || !vs[0].Active {
		t.Fatalf("verdicts: %+v %v", vs, err)
	}
	health, err := api.FleetHealth(ctx)
	if err != nil || health.Devices.Total != 1 || len(health.FlaggedFirmware) != 1 {
		t.Fatalf("fleet health: %+v %v", health, err)
	}
	_, err = api.Devices(ctx, client.DeviceQuery{Compat: "maybe"})
	wantAPIError(t, err, http.StatusBadRequest, "compat")
}
