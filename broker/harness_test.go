package broker

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// env is a real broker on loopback backed by a real registry.
type env struct {
	t    *testing.T
	pool *pgxpool.Pool
	svc  *fleet.Service
	rec  *fleet.Recorder
	b    *Broker
	log  *logBuffer
}

type option func(*Config)

func newEnv(t *testing.T, opts ...option) *env {
	t.Helper()
	return newEnvWithPool(t, pgtest.New(t), t.TempDir(), opts...)
}

func newEnvWithPool(t *testing.T, pool *pgxpool.Pool, dir string, opts ...option) *env {
	t.Helper()
	h, err := fleet.NewHasher([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	store := fleet.NewStore(pool)
	svc := fleet.NewService(store, h, logger)
	rec, err := fleet.NewRecorder(store, fleet.RecorderOptions{SpoolPath: dir + "/spool/events.jsonl", FlushInterval: 10 * time.Millisecond,
		WriteTimeout: 2 * time.Second, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{TCPAddr: "127.0.0.1:0", Node: "test", ConnectTimeout: 2 * time.Second, LastSeenInterval: 100 * time.Millisecond}
	for _, o := range opts {
		o(&cfg)
	}
	b, err := New(cfg, svc, rec, logger, nil)
	if err != nil {
		t.Fatal(err)
	}
	svc.OnRevoke(b.Kick)
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, pool: pool, svc: svc, rec: rec, b: b, log: logs}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		b.Close(ctx)
		rec.Close(ctx)
		if t.Failed() {
			t.Logf("broker log:\n%s", logs.String())
		}
	})
	return e
}

func (e *env) addr(listener string) string { return e.b.Addrs()[listener] }

// register creates a device and returns its token.
func (e *env) register(id string) string {
	e.t.Helper()
	_, token, err := e.svc.Register(context.Background(), fleet.NewDevice{ID: id, Model: "gw-100"})
	if err != nil {
		e.t.Fatal(err)
	}
	return token
}

// waitEvent polls the registry until the device has an event matching pred.
func (e *env) waitEvent(id string, within time.Duration, pred func(fleet.Event) bool) fleet.Event {
	e.t.Helper()
	deadline := time.Now().Add(within)
	var seen []fleet.Event
	for time.Now().Before(deadline) {
		events, err := e.svc.Events(context.Background(), id, nil, 1000)
		if err != nil {
			e.t.Fatal(err)
		}
		for _, ev := range events {
			if pred(ev) {
				return ev
			}
		}
		seen = events
		time.Sleep(20 * time.Millisecond)
	}
	e.t.Fatalf("no matching event for %s within %s; events: %s", id, within, describe(seen))
	return fleet.Event{}
}

// waitDevice polls until the device matches pred.
func (e *env) waitDevice(id string, within time.Duration, pred func(fleet.Device) bool) fleet.Device {
	e.t.Helper()
	deadline := time.Now().Add(within)
	var d fleet.Device
	var err error
	for time.Now().Before(deadline) {
		if d, err = e.svc.Get(context.Background(), id); err != nil {
			e.t.Fatal(err)
		}
		if pred(d) {
			return d
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.t.Fatalf("device %s never matched within %s: %+v", id, within, d)
	return d
}

func isEvent(kind fleet.Kind, reason fleet.Reason) func(fleet.Event) bool {
	return func(ev fleet.Event) bool { return ev.Kind == kind && (reason == "" || ev.Reason == reason) }
}

func describe(events []fleet.Event) string {
	var b strings.Builder
	for _, ev := range events {
		fmt.Fprintf(&b, "\n  %s %s %s %q epoch=%d", ev.At.Format("15:04:05.000"), ev.Kind, ev.Reason, ev.Detail, ev.SessionEpoch)
	}
	return b.String()
}

type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func birthPayload(firmware string) []byte {
	return []byte(fmt.Sprintf(`{"online":true,"firmware":%q,"model":"gw-100"}`, firmware))
}
