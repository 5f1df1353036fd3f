// Package brokertest runs a real broker backed by a real registry in the test
// process, on loopback, for packages that need to drive it directly (send a
// device a message, watch what devices publish).
package brokertest

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
)

// Env is a running broker and registry.
type Env struct {
	Broker   *broker.Broker
	Service  *fleet.Service
	Recorder *fleet.Recorder
	Pool     *pgxpool.Pool
	// Addrs are the listeners' addresses by id ("tcp", "tls", "ws").
	Addrs map[string]string
}

// Start runs a broker with a TCP listener on 127.0.0.1:0; configure can
// change the broker's configuration first. Everything stops when the test ends.
func Start(t testing.TB, configure func(*broker.Config)) *Env {
	t.Helper()
	pool := pgtest.New(t)
	h, err := fleet.NewHasher([]byte("brokertest-pepper-0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	level := slog.LevelWarn
	if os.Getenv("FLEETD_TEST_LOG") != "" {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	store := fleet.NewStore(pool)
	svc := fleet.NewService(store, h, logger)
	rec, err := fleet.NewRecorder(store, fleet.RecorderOptions{SpoolPath: filepath.Join(t.TempDir(), "events.jsonl"),
		FlushInterval: 10 * time.Millisecond, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	cfg := broker.Config{TCPAddr: "127.0.0.1:0", Node: "brokertest", ConnectTimeout: 5 * time.Second, LastSeenInterval: time.Second}
	if configure != nil {
		configure(&cfg)
	}
	b, err := broker.New(cfg, svc, rec, logger, nil)
	if err != nil {
		t.Fatal(err)
	}
	svc.OnRevoke(b.Kick)
	svc.OnRotate(b.EndRotated)
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		b.Close(ctx)
		rec.Close(ctx)
	})
	return &Env{Broker: b, Service: svc, Recorder: rec, Pool: pool, Addrs: b.Addrs()}
}

// Register creates a device and returns its token.
func (e *Env) Register(t testing.TB, id, model string) string {
	t.Helper()
	_, token, err := e.Service.Register(context.Background(), fleet.NewDevice{ID: id, Model: model})
	if err != nil {
		t.Fatal(err)
	}
	return token
}
