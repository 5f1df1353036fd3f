package fleet

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func newService(t *testing.T) (*Service, *pgxpool.Pool) {
	t.Helper()
	pool := pgtest.New(t)
	h, err := NewHasher([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	return NewService(NewStore(pool), h, nil), pool
}

func TestRegisterAuthenticateDecommission(t *testing.T) {
	ctx := context.Background()
	svc, _ := newService(t)
	var revoked []string
	svc.OnRevoke(func(id string) { revoked = append(revoked, id) })

	d, token, err := svc.Register(ctx, NewDevice{ID: "gw-1", Model: "gw-100", Tags: []string{"site=lyon"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(token) != 43 || d.State != StateActive {
		t.Fatalf("register: token %q (%d chars), device %+v", token, len(token), d)
	}
	if _, _, err := svc.Register(ctx, NewDevice{ID: "gw-1"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("duplicate register: got %v, want ErrConflict", err)
	}

	auth := func(id, tok string) AuthResult {
		t.Helper()
		info, err := svc.Authenticate(ctx, id, []byte(tok))
		if err != nil {
			t.Fatal(err)
		}
		return info.Result
	}
	if got := auth("gw-1", token); got != AuthOK {
		t.Fatalf("right token: %v", got)
	}
	if got := auth("gw-1", token+"x"); got != AuthBadToken {
		t.Fatalf("wrong token: %v", got)
	}
	if got := auth("nobody", token); got != AuthUnknownDevice {
		t.Fatalf("unknown id: %v", got)
	}

	// A fresh service (another start) authenticates from the warmed cache.
	svc2 := NewService(svc.store, svc.hasher, nil)
	if n, err := svc2.WarmCache(ctx); err != nil || n != 1 {
		t.Fatalf("WarmCache: %d, %v", n, err)
	}
	if info, _ := svc2.Authenticate(ctx, "gw-1", []byte(token)); info.Result != AuthOK || info.Model != "gw-100" {
		t.Fatalf("after warm: %+v", info)
	}

	newTok, err := svc.RotateToken(ctx, "gw-1")
	if err != nil {
		t.Fatal(err)
	}
	if got := auth("gw-1", token); got != AuthBadToken {
		t.Fatalf("old token after rotation: %v", got)
	}
	if got := auth("gw-1", newTok); got != AuthOK {
		t.Fatalf("new token after rotation: %v", got)
	}

	if _, err := svc.Decommission(ctx, "gw-1"); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"gw-1"}, revoked); diff != "" {
		t.Fatalf("revoke hooks mismatch (-want +got):\n%s", diff)
	}
	if got := auth("gw-1", newTok); got != AuthDecommissioned {
		t.Fatalf("after decommission: %v", got)
	}
	if _, err := svc.Decommission(ctx, "gw-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second decommission: %v, want ErrNotFound", err)
	}

	// The id can be registered again, with a new token.
	_, again, err := svc.Register(ctx, NewDevice{ID: "gw-1", Model: "gw-200"})
	if err != nil {
		t.Fatalf("re-register after decommission: %v", err)
	}
	if got := auth("gw-1", again); got != AuthOK {
		t.Fatalf("re-registered device: %v", got)
	}
	if got := auth("gw-1", newTok); got != AuthBadToken {
		t.Fatalf("pre-decommission token after re-registration: %v", got)
	}
}

func TestValidation(t *testing.T) {
	ctx := context.Background()
	svc, _ := newService(t)
	tests := []struct {
		name  string
		dev   NewDevice
		field string
	}{
		{"empty id", NewDevice{}, "id"},
		{"slash in id", NewDevice{ID: "a/b"}, "id"},
		{"wildcard in id", NewDevice{ID: "a+"}, "id"},
		{"dollar id", NewDevice{ID: "$SYS"}, "id"},
		{"long id", NewDevice{ID: string(make([]byte, 129))}, "id"},
		{"bad model", NewDevice{ID: "ok", Model: "a b"}, "model"},
		{"empty tag", NewDevice{ID: "ok", Tags: []string{""}}, "tags[0]"},
		{"repeated tag", NewDevice{ID: "ok", Tags: []string{"a", "a"}}, "tags[1]"},
		{"slash in a tag without a value", NewDevice{ID: "ok", Tags: []string{"Europe/Paris"}}, "tags[0]"},
		{"slash in a tag key", NewDevice{ID: "ok", Tags: []string{"t/z=UTC"}}, "tags[0]"},
		{"wildcard in a tag key", NewDevice{ID: "ok", Tags: []string{"tz+=UTC"}}, "tags[0]"},
	}
	// A time zone is a tag value (tz=Europe/Paris, tz=Etc/GMT+1): see
	// firmware's maintenance windows.
	if _, _, err := svc.Register(ctx, NewDevice{ID: "zoned", Tags: []string{"tz=Europe/Paris", "tz2=Etc/GMT+1"}}); err != nil {
		t.Errorf("a device with time zone tags: %v", err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := svc.Register(ctx, tt.dev)
			var ve *ValidationError
			if !errors.As(err, &ve) || ve.Field != tt.field {
				t.Fatalf("got %v, want a validation error on %q", err, tt.field)
			}
		})
	}
}

func TestListFiltersAndPaging(t *testing.T) {
	ctx := context.Background()
	svc, _ := newService(t)
	for _, n := range []NewDevice{{ID: "a1", Model: "m1"}, {ID: "a2", Model: "m2"}, {ID: "a3", Model: "m1", Tags: []string{"lab"}}, {ID: "a4", Model: "m1"}} {
		if _, _, err := svc.Register(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now().UTC().Truncate(time.Microsecond)
	err := svc.store.writeEvents(ctx, []Event{
		{ID: NewEventID(now), DeviceID: "a1", At: now, Kind: KindConnect, SessionEpoch: 10, ProtocolVersion: 5},
		{ID: NewEventID(now), DeviceID: "a1", At: now, Kind: KindBirth, Firmware: "1.2.0"},
		{ID: NewEventID(now), DeviceID: "a3", At: now, Kind: KindConnect, SessionEpoch: 11, ProtocolVersion: 4},
	})
	if err != nil {
		t.Fatal(err)
	}
	ids := func(f Filter) []string {
		t.Helper()
		ds, _, err := svc.List(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		out := []string{}
		for _, d := range ds {
			out = append(out, d.ID)
		}
		return out
	}
	tests := []struct {
		name string
		f    Filter
		want []string
	}{
		{"all", Filter{}, []string{"a1", "a2", "a3", "a4"}},
		{"model", Filter{Model: "m1"}, []string{"a1", "a3", "a4"}},
		{"online", Filter{Status: "online"}, []string{"a1", "a3"}},
		{"offline", Filter{Status: "offline"}, []string{"a2", "a4"}},
		{"firmware", Filter{Firmware: "1.2.0"}, []string{"a1"}},
		{"protocol", Filter{Protocol: 4}, []string{"a3"}},
		{"tag", Filter{Tag: "lab"}, []string{"a3"}},
		{"after", Filter{After: "a2"}, []string{"a3", "a4"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, ids(tt.f)); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
	page, next, _ := svc.List(ctx, Filter{Limit: 3})
	if len(page) != 3 || next != "a3" {
		t.Fatalf("first page: %d devices, next %q", len(page), next)
	}
	page, next, _ = svc.List(ctx, Filter{Limit: 3, After: next})
	if len(page) != 1 || next != "" {
		t.Fatalf("last page: %d devices, next %q", len(page), next)
	}
	if _, _, err := svc.List(ctx, Filter{Status: "sleeping"}); err == nil {
		t.Fatal("bad status accepted")
	}
}

// TestPresenceEpochs plays the takeover race: the old session's disconnect
// arrives after the new session's connect, in the same batch or a later one.
func TestPresenceEpochs(t *testing.T) {
	ctx := context.Background()
	svc, _ := newService(t)
	svc.Register(ctx, NewDevice{ID: "d"})
	at := time.Now().UTC()
	ev := func(kind Kind, epoch int64, reason Reason) Event {
		at = at.Add(time.Millisecond)
		return Event{ID: NewEventID(at), DeviceID: "d", At: at, Kind: kind, SessionEpoch: epoch, Reason: reason}
	}
	online := func() (bool, int64, Reason) {
		d, err := svc.Get(ctx, "d")
		if err != nil {
			t.Fatal(err)
		}
		return d.Online, d.SessionEpoch, d.LastDisconnect
	}
	write := func(events ...Event) {
		t.Helper()
		if err := svc.store.writeEvents(ctx, events); err != nil {
			t.Fatal(err)
		}
	}

	write(ev(KindConnect, 1, ""))
	// Takeover in one batch: new connect, then the old session's late disconnect.
	write(ev(KindConnect, 2, ""), ev(KindDisconnect, 1, ReasonSessionTakeover))
	if on, epoch, _ := online(); !on || epoch != 2 {
		t.Fatalf("after takeover in one batch: online=%v epoch=%d, want online at epoch 2", on, epoch)
	}
	// The late disconnect in a batch of its own changes nothing either.
	write(ev(KindDisconnect, 1, ReasonSessionTakeover))
	if on, _, _ := online(); !on {
		t.Fatal("late takeover disconnect marked the new session offline")
	}
	// The live session's own end does.
	last := ev(KindDisconnect, 2, ReasonKeepaliveTimeout)
	write(last)
	if on, _, reason := online(); on || reason != ReasonKeepaliveTimeout {
		t.Fatalf("after disconnect: online=%v reason=%s", on, reason)
	}
	// Replaying everything (a spool replay) stores nothing twice and keeps presence.
	write(last, last)
	events, err := svc.Events(ctx, "d", nil, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != 5 {
		t.Fatalf("%d events stored, want 5", len(events))
	}
	if events[0].ID != last.ID {
		t.Fatalf("newest event first: got %s, want %s", events[0].ID, last.ID)
	}
	// Cursor paging.
	older, _ := svc.Events(ctx, "d", &EventCursor{At: events[1].At, ID: events[1].ID}, 100)
	if len(older) != 3 {
		t.Fatalf("events before the second newest: %d, want 3", len(older))
	}
}

func TestEventIDRoundTrip(t *testing.T) {
	id := NewEventID(time.Now())
	var back EventID
	if err := back.UnmarshalText([]byte(id.String())); err != nil || back != id {
		t.Fatalf("round trip: %v %v != %v", err, back, id)
	}
	if id.String()[14] != '7' {
		t.Fatalf("not a version 7 UUID: %s", id)
	}
}
