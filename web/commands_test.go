package web

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/web/client"
)

// fakeSender stands in for the router: it records what it is asked to send.
type fakeSender struct {
	mu        sync.Mutex
	listening bool
	sent      []string // sub|responseSub|correlation
}

func (f *fakeSender) SendRequest(_, sub string, _ []byte, responseSub string, correlation []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sent = append(f.sent, sub+"|"+responseSub+"|"+string(correlation))
	return nil
}

func (f *fakeSender) Listening(string, string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.listening
}

type nopEvents struct{}

func (nopEvents) Record(fleet.Event) {}

// TestCommandAPI: every field of a command request is validated with a 4xx
// naming it, the command is created queued (or delivered when the device
// listens), its state is read back, listed page by page, and the caps give
// 429.
func TestCommandAPI(t *testing.T) {
	pool := pgtest.New(t)
	h, _ := fleet.NewHasher(bytes.Repeat([]byte("k"), 32))
	devices := fleet.NewService(fleet.NewStore(pool), h, nil)
	ctx := context.Background()
	if _, _, err := devices.Register(ctx, fleet.NewDevice{ID: "d1", Model: "gw-100"}); err != nil {
		t.Fatal(err)
	}
	send := &fakeSender{}
	svc := command.NewService(command.NewStore(pool), send, nopEvents{}, command.Options{Limits: command.Limits{MaxPending: 3}})
	s := New(Options{AdminToken: token})
	s.MountCommands(svc)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	api := client.New(srv.URL, token)

	post := func(body string) (int, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/api/v1/devices/d1/commands", strings.NewReader(body))
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
	for _, tt := range []struct {
		body, field string
	}{
		{`{"name":"Reboot"}`, "name"},
		{`{}`, "name"},
		{`{"name":"response"}`, "name"},
		{`{"name":"ping","params":[1]}`, "params"},
		{`{"name":"ping","params":{"x":"` + strings.Repeat("y", 5000) + `"}}`, "params"},
		{`{"name":"ping","timeout":"soon"}`, "timeout"},
		{`{"name":"ping","timeout":"1h"}`, "timeout"},
		{`{"name":"ping","timeout":true}`, "timeout"},
		{`{"name":"ping","expires_in":"0.1s"}`, "expires_in"},
		{`{"name":"ping","expires_in":"72h"}`, "expires_in"},
		{`{"name":"ping","color":"red"}`, "color"},
		{`{"name":7}`, "name"},
		{`not json`, "body"},
	} {
		status, out := post(tt.body)
		e, _ := out["error"].(map[string]any)
		if status != http.StatusBadRequest || e["field"] != tt.field {
			t.Errorf("%s: %d %v, want 400 naming %s", tt.body, status, out, tt.field)
		}
	}
	if _, err := api.SendCommand(ctx, "nobody", command.Request{Name: "ping"}); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("unknown device: %v", err)
	}

	queued, err := api.SendCommand(ctx, "d1", command.Request{Name: "ping", Params: json.RawMessage(`{"a": 1}`), Timeout: command.Duration(2 * time.Second)})
	if err != nil || queued.State != command.StateQueued || string(queued.Params) != `{"a":1}` || queued.Timeout.D() != 2*time.Second {
		t.Fatalf("created %+v %v", queued, err)
	}
	send.mu.Lock()
	send.listening = true
	send.mu.Unlock()
	delivered, err := api.SendCommand(ctx, "d1", command.Request{Name: "reboot"})
	if err != nil || delivered.State != command.StateDelivered {
		t.Fatalf("created for a listening device: %+v %v", delivered, err)
	}
	if want := "cmd/reboot|cmd/response|" + delivered.ID; len(send.sent) != 1 || send.sent[0] != want {
		t.Fatalf("sent %q, want %q", send.sent, want)
	}
	got, err := api.Command(ctx, "d1", queued.ID, 0)
	if err != nil || got.ID != queued.ID || got.State != command.StateQueued {
		t.Fatalf("get: %+v %v", got, err)
	}
	// A wait ends when its time is up, with the state as it is.
	start := time.Now()
	if got, err = api.Command(ctx, "d1", queued.ID, time.Second); err != nil || got.State != command.StateQueued || time.Since(start) < time.Second {
		t.Fatalf("wait: %+v %v after %s", got, err, time.Since(start))
	}
	_, _ = api.SendCommand(ctx, "d1", command.Request{Name: "ping"})
	if _, err := api.SendCommand(ctx, "d1", command.Request{Name: "ping"}); err == nil || !strings.Contains(err.Error(), "429 too_many_pending") {
		t.Fatalf("past the pending cap: %v", err)
	}

	page, err := api.Commands(ctx, "d1", "", 2)
	if err != nil || len(page.Commands) != 2 || page.NextCursor == "" {
		t.Fatalf("first page: %+v %v", page, err)
	}
	page2, err := api.Commands(ctx, "d1", page.NextCursor, 2)
	if err != nil || len(page2.Commands) != 1 || page2.NextCursor != "" || page2.Commands[0].ID != queued.ID {
		t.Fatalf("second page: %+v %v", page2, err)
	}
	for _, tt := range []struct{ path, field string }{
		{"/api/v1/devices/d1/commands?limit=500", "limit"},
		{"/api/v1/devices/d1/commands?limit=x", "limit"},
		{"/api/v1/devices/d1/commands?cursor=zzz", "cursor"},
		{"/api/v1/devices/d1/commands/" + queued.ID + "?wait=61", "wait"},
		{"/api/v1/devices/d1/commands/" + queued.ID + "?wait=soon", "wait"},
	} {
		rec, body := do(t, s, http.MethodGet, tt.path, map[string]string{"Authorization": "Bearer " + token})
		e, _ := body["error"].(map[string]any)
		if rec.Code != http.StatusBadRequest || e["field"] != tt.field {
			t.Errorf("%s: %d %v, want 400 naming %s", tt.path, rec.Code, body, tt.field)
		}
	}
	for _, path := range []string{"/api/v1/devices/d1/commands/cmd_00000000000000000000000000000000", "/api/v1/devices/other/commands/" + queued.ID} {
		if rec, _ := do(t, s, http.MethodGet, path, map[string]string{"Authorization": "Bearer " + token}); rec.Code != http.StatusNotFound {
			t.Errorf("%s: %d, want 404", path, rec.Code)
		}
	}
}
