package notify

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func TestSignVerify(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	body := []byte(`{"id":1}`)
	h := Sign("s3cret", now, body)
	if !strings.HasPrefix(h, "t=1800000000,v1=") {
		t.Fatalf("header %q", h)
	}
	if err := Verify("s3cret", h, body, time.Minute, now.Add(30*time.Second)); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"other secret": Verify("other", h, body, time.Minute, now),
		"other body":   Verify("s3cret", h, []byte(`{"id":2}`), time.Minute, now),
		"replayed":     Verify("s3cret", h, body, time.Minute, now.Add(2*time.Minute)),
		"malformed":    Verify("s3cret", "v1=abc", body, time.Minute, now),
	} {
		if err == nil {
			t.Errorf("%s: verified", name)
		}
	}
}

func TestBackoff(t *testing.T) {
	d := NewDeliverer(nil, Options{RetryMin: time.Second, RetryMax: 8 * time.Second})
	for attempt, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: 4 * time.Second, 4: 8 * time.Second, 9: 8 * time.Second} {
		for range 50 {
			if got := d.backoff(attempt); got < want/2 || got > want {
				t.Fatalf("backoff(%d) = %s, want within [%s, %s]", attempt, got, want/2, want)
			}
		}
	}
}

func TestSubscriptionValidation(t *testing.T) {
	s := NewStore(pgtest.New(t))
	ctx := context.Background()
	for _, c := range []struct {
		spec  Spec
		field string
	}{
		{Spec{URL: "ftp://x/y", Events: []Type{CampaignCompleted}}, "url"},
		{Spec{URL: "/relative", Events: []Type{CampaignCompleted}}, "url"},
		{Spec{URL: "https://user:pw@example.com/", Events: []Type{CampaignCompleted}}, "url"},
		{Spec{URL: "https://example.com/" + strings.Repeat("a", 2048), Events: []Type{CampaignCompleted}}, "url"},
		{Spec{URL: "https://example.com/", Events: nil}, "events"},
		{Spec{URL: "https://example.com/", Events: []Type{"campaign.exploded"}}, "events"},
		{Spec{URL: "https://example.com/", Events: []Type{WebhookTest}}, "events"},
		{Spec{URL: "https://example.com/", Events: []Type{CampaignCompleted}, Description: "a\nb"}, "description"},
	} {
		_, err := s.Create(ctx, c.spec, "admin")
		var ve *ValidationError
		if !errors.As(err, &ve) || ve.Field != c.field {
			t.Errorf("%+v: %v, want a validation error on %s", c.spec, err, c.field)
		}
	}
	sub, err := s.Create(ctx, Spec{URL: "https://example.com/hook", Events: []Type{FirmwareFlagged, CampaignCompleted, FirmwareFlagged}}, "admin")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(sub.Secret, "whsec_") || len(sub.Events) != 2 || sub.Events[0] != CampaignCompleted {
		t.Fatalf("created %+v", sub)
	}
	got, err := s.Get(ctx, sub.ID)
	if err != nil || got.Secret != "" {
		t.Fatalf("get shows the secret or fails: %+v, %v", got, err)
	}
	if _, err := s.Get(ctx, "wh_nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown id: %v", err)
	}
	for i := 1; i < MaxSubscriptions; i++ {
		if _, err := s.Create(ctx, Spec{URL: "https://example.com/hook", Events: []Type{CampaignCompleted}}, "admin"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Create(ctx, Spec{URL: "https://example.com/hook", Events: []Type{CampaignCompleted}}, "admin"); !errors.Is(err, ErrTooMany) {
		t.Fatalf("subscription %d: %v, want ErrTooMany", MaxSubscriptions+1, err)
	}
}

// receiver is a webhook endpoint that answers with the next status of its
// script (then 200) and keeps what it got.
type receiver struct {
	mu       sync.Mutex
	script   []int
	got      []received
	arrivals chan struct{}
}

type received struct {
	header http.Header
	body   []byte
	at     time.Time
}

func newReceiver(t *testing.T, script ...int) (*receiver, *httptest.Server) {
	r := &receiver{script: script, arrivals: make(chan struct{}, 100)}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		r.mu.Lock()
		r.got = append(r.got, received{req.Header.Clone(), body, time.Now()})
		status := http.StatusOK
		if len(r.script) > 0 {
			status, r.script = r.script[0], r.script[1:]
		}
		r.mu.Unlock()
		w.WriteHeader(status)
		r.arrivals <- struct{}{}
	}))
	t.Cleanup(srv.Close)
	return r, srv
}

func (r *receiver) requests() []received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]received(nil), r.got...)
}

// deliverUntil runs the deliverer until cond holds or 10 s pass.
func deliverUntil(t *testing.T, d *Deliverer, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 10s", what)
		}
		if _, err := d.DeliverDue(context.Background()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestDeliveryRetriesAfterA500(t *testing.T) {
	pool := pgtest.New(t)
	ctx := context.Background()
	s := NewStore(pool)
	rcv, srv := newReceiver(t, http.StatusInternalServerError)
	sub, err := s.Create(ctx, Spec{URL: srv.URL + "/hook", Events: []Type{FirmwareFlagged}}, "admin")
	if err != nil {
		t.Fatal(err)
	}
	other, err := s.Create(ctx, Spec{URL: srv.URL + "/other", Events: []Type{CampaignCompleted}}, "admin")
	if err != nil {
		t.Fatal(err)
	}
	if err := Publish(ctx, pool, FirmwareFlagged, map[string]any{"model": "gw-100", "firmware": "1.0.3"}); err != nil {
		t.Fatal(err)
	}
	d := NewDeliverer(pool, Options{Node: "n1", RetryMin: 100 * time.Millisecond, RetryMax: 200 * time.Millisecond})
	deliverUntil(t, d, "second attempt", func() bool { return len(rcv.requests()) >= 2 })
	reqs := rcv.requests()
	if len(reqs) != 2 {
		t.Fatalf("%d requests, want 2 (the other subscription is not subscribed)", len(reqs))
	}
	if gap := reqs[1].at.Sub(reqs[0].at); gap < 50*time.Millisecond {
		t.Errorf("retried after %s, before the backoff", gap)
	}
	for i, r := range reqs {
		if err := Verify(sub.Secret, r.header.Get(HeaderSignature), r.body, time.Minute, time.Now()); err != nil {
			t.Errorf("request %d: %v", i, err)
		}
		if r.header.Get(HeaderEvent) != string(FirmwareFlagged) || r.header.Get(HeaderDelivery) != reqs[0].header.Get(HeaderDelivery) {
			t.Errorf("request %d headers %v", i, r.header)
		}
		var b Body
		if err := json.Unmarshal(r.body, &b); err != nil || b.Type != FirmwareFlagged || !strings.Contains(string(b.Data), `"1.0.3"`) {
			t.Errorf("request %d body %s (%v)", i, r.body, err)
		}
	}
	log, err := s.Deliveries(ctx, sub.ID, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(log) != 1 || log[0].State != "delivered" || log[0].Attempts != 2 || len(log[0].Log) != 2 ||
		log[0].Log[0].Status != 500 || log[0].Log[1].Status != 200 || log[0].Log[0].Node != "n1" {
		t.Fatalf("delivery log %+v", log)
	}
	if ol, _ := s.Deliveries(ctx, other.ID, 0, 0); len(ol) != 0 {
		t.Fatalf("the other subscription got %+v", ol)
	}
	// A test notification reaches the one subscription asked.
	if _, err := s.Test(ctx, other.ID, "admin"); err != nil {
		t.Fatal(err)
	}
	deliverUntil(t, d, "test delivery", func() bool { return len(rcv.requests()) >= 3 })
	if r := rcv.requests()[2]; r.header.Get(HeaderEvent) != string(WebhookTest) || Verify(other.Secret, r.header.Get(HeaderSignature), r.body, time.Minute, time.Now()) != nil {
		t.Fatalf("test delivery %v %s", r.header, r.body)
	}
}

func TestFailingSubscriptionIsDisabled(t *testing.T) {
	pool := pgtest.New(t)
	ctx := context.Background()
	s := NewStore(pool)
	_, bad := newReceiver(t, 500, 500, 500, 500, 500, 500)
	_, good := newReceiver(t)
	sub, err := s.Create(ctx, Spec{URL: bad.URL, Events: []Type{CampaignCompleted}}, "admin")
	if err != nil {
		t.Fatal(err)
	}
	watcher, err := s.Create(ctx, Spec{URL: good.URL, Events: []Type{WebhookDisabled}}, "admin")
	if err != nil {
		t.Fatal(err)
	}
	d := NewDeliverer(pool, Options{RetryMin: 10 * time.Millisecond, RetryMax: 10 * time.Millisecond, MaxAttempts: 2, DisableAfter: 3})
	for range 3 {
		if err := Publish(ctx, pool, CampaignCompleted, map[string]string{"campaign_id": "c1"}); err != nil {
			t.Fatal(err)
		}
	}
	deliverUntil(t, d, "disabling", func() bool {
		got, err := s.Get(ctx, sub.ID)
		return err == nil && !got.Enabled
	})
	got, _ := s.Get(ctx, sub.ID)
	if !strings.Contains(got.DisabledReason, "3 attempts failed in a row") || got.DisabledAt == nil {
		t.Fatalf("disabled as %+v", got)
	}
	deliverUntil(t, d, "every delivery finished", func() bool {
		ds, _ := s.Deliveries(ctx, sub.ID, 0, 0)
		for _, d := range ds {
			if d.State == "pending" {
				return false
			}
		}
		return len(ds) == 3
	})
	ds, _ := s.Deliveries(ctx, sub.ID, 0, 0)
	for _, d := range ds {
		if d.State != "failed" {
			t.Errorf("delivery %d is %s", d.ID, d.State)
		}
	}
	deliverUntil(t, d, "the notice", func() bool {
		ds, _ := s.Deliveries(ctx, watcher.ID, 0, 0)
		return len(ds) == 1 && ds[0].State == "delivered"
	})
	ws, _ := s.Deliveries(ctx, watcher.ID, 0, 0)
	if !strings.Contains(string(ws[0].Payload), sub.ID) {
		t.Fatalf("notice %s does not name the subscription", ws[0].Payload)
	}
	// Enabling again starts afresh.
	on := true
	got, err = s.Update(ctx, sub.ID, Patch{Enabled: &on})
	if err != nil || !got.Enabled || got.ConsecutiveFailures != 0 || got.DisabledReason != "" {
		t.Fatalf("enabled: %+v, %v", got, err)
	}
	// A new notification after that is delivered to it.
	if err := Publish(ctx, pool, CampaignCompleted, map[string]string{"campaign_id": "c2"}); err != nil {
		t.Fatal(err)
	}
	n, err := count(pool, `SELECT count(*) FROM webhook_deliveries WHERE subscription_id = $1 AND state = 'pending'`, sub.ID)
	if err != nil || n != 1 {
		t.Fatalf("%d pending deliveries after enabling, want 1 (%v)", n, err)
	}
}

func count(pool *pgxpool.Pool, q string, args ...any) (int, error) {
	var n int
	err := pool.QueryRow(context.Background(), q, args...).Scan(&n)
	return n, err
}

// The triggers turn campaign history and verdict history into
// notifications, whichever code path or replica wrote them.
func TestTriggersWriteNotifications(t *testing.T) {
	pool := pgtest.New(t)
	ctx := context.Background()
	for _, q := range []string{
		`INSERT INTO firmware (id, version, models, sha256, size, signature, signed_by) VALUES ('fw_1', '1.1.0', '{gw-100}', 'x', 1, 'sig', 'k')`,
		`INSERT INTO campaigns (id, name, firmware_id, version, spec, state) VALUES ('c1', 'heal', 'fw_1', '1.1.0', '{}', 'paused')`,
		`INSERT INTO campaign_history (campaign_id, actor, action, detail) VALUES ('c1', 'fleetd', 'gate_breached', '{"reason":"failure rate 40%","gate":{"gate":"failure_rate"}}')`,
		`INSERT INTO campaign_history (campaign_id, actor, action) VALUES ('c1', 'admin', 'resume')`,
		`INSERT INTO campaign_history (campaign_id, actor, action, detail) VALUES ('c1', 'fleetd', 'awaiting_approval', '{"stage":1}')`,
		`INSERT INTO campaign_history (campaign_id, actor, action) VALUES ('c1', 'admin', 'abort')`,
		`INSERT INTO firmware_verdict_history (model, firmware, flag, change, rate, baseline, evidence) VALUES ('gw-100', '1.0.3', 'rejects_pings', 'flagged', 9, 1, '{}')`,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	rows, err := pool.Query(ctx, `SELECT type, payload FROM notifications ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var got []string
	for rows.Next() {
		var typ string
		var payload map[string]any
		if err := rows.Scan(&typ, &payload); err != nil {
			t.Fatal(err)
		}
		got = append(got, typ)
		if typ == string(CampaignPausedByGate) && (payload["reason"] != "failure rate 40%" || payload["name"] != "heal") {
			t.Errorf("gate payload %v", payload)
		}
	}
	want := []string{string(CampaignPausedByGate), string(CampaignAwaitingApproval), string(CampaignAborted), string(FirmwareFlagged)}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("notifications %v, want %v", got, want)
	}
}
