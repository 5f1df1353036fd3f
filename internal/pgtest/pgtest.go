// Package pgtest gives each test its own PostgreSQL database, cloned from a
// template that holds every migration. It uses FLEETD_TEST_DATABASE_URL when
// set; otherwise it starts one private PostgreSQL per test binary with the same
// code as fleetd's embedded mode (internal/pgserver), so tests never need a
// server set up by hand.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/pgserver"
	"github.com/fleetd/fleetd/migrations"
)

// EnvURL names the variable that points the tests at an existing server. Its
// role must be allowed to create databases.
const EnvURL = "FLEETD_TEST_DATABASE_URL"

type harness struct {
	server   *pgserver.Server // nil when EnvURL is used
	dir      string
	adminURL string // connects to a maintenance database on the server
	template string
}

var (
	once   sync.Once
	shared *harness
	errH   error
)

// Main runs the package's tests and then stops the private server and removes
// its files. Use it from TestMain in every package that calls New or URL:
//
//	func TestMain(m *testing.M) { pgtest.Main(m) }
func Main(m *testing.M) {
	code := m.Run()
	if shared != nil {
		shared.close()
	}
	os.Exit(code)
}

// New returns a pool on a fresh, migrated database that is dropped when the
// test ends.
func New(t testing.TB) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), URL(t))
	if err != nil {
		t.Fatalf("pgtest: open pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// URL creates a fresh, migrated database and returns its connection string;
// the database is dropped when the test ends.
func URL(t testing.TB) string {
	t.Helper()
	h := get(t)
	name := "pgtest_" + randomSuffix()
	ctx := context.Background()
	if err := h.exec(ctx, fmt.Sprintf("CREATE DATABASE %s TEMPLATE %s", name, h.template)); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	t.Cleanup(func() {
		if err := h.exec(context.Background(), fmt.Sprintf("DROP DATABASE IF EXISTS %s WITH (FORCE)", name)); err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})
	return withDatabase(h.adminURL, name)
}

// AdminURL returns a connection string for the server's maintenance database,
// for tests that create databases of their own (e.g. concurrent migrations on
// an empty database).
func AdminURL(t testing.TB) string {
	t.Helper()
	return get(t).adminURL
}

// EmptyURL creates an empty database (no migrations) that is dropped when the
// test ends.
func EmptyURL(t testing.TB) string {
	t.Helper()
	h := get(t)
	name := "pgtest_empty_" + randomSuffix()
	if err := h.exec(context.Background(), "CREATE DATABASE "+name); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	t.Cleanup(func() {
		_ = h.exec(context.Background(), fmt.Sprintf("DROP DATABASE IF EXISTS %s WITH (FORCE)", name))
	})
	return withDatabase(h.adminURL, name)
}

func get(t testing.TB) *harness {
	t.Helper()
	once.Do(func() { shared, errH = start() })
	if errH != nil {
		t.Fatalf("pgtest: %v", errH)
	}
	return shared
}

func start() (*harness, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	h := &harness{}
	if url := os.Getenv(EnvURL); url != "" {
		h.adminURL = url
	} else {
		bin, err := pgserver.FindBinDir(os.Getenv("FLEETD_PG_BIN"))
		if err != nil {
			return nil, err
		}
		// Not t.TempDir: its 0700 parents would keep the postgres user out when
		// the tests run as root.
		dir, err := os.MkdirTemp("", "fleetd-pgtest-")
		if err != nil {
			return nil, err
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			return nil, err
		}
		h.dir = dir
		h.server = &pgserver.Server{
			Dir:           dir,
			BinDir:        bin,
			DieWithParent: true,
			Logger:        slog.New(slog.DiscardHandler),
			// Durability buys nothing in a throwaway cluster.
			Settings: map[string]string{"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "300"},
		}
		if err := h.server.Start(ctx); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		h.adminURL = h.server.ConnString()
	}
	h.template = "pgtest_tmpl_" + randomSuffix()
	if err := h.exec(ctx, "CREATE DATABASE "+h.template); err != nil {
		h.close()
		return nil, fmt.Errorf("create template: %w", err)
	}
	pool, err := pgxpool.New(ctx, withDatabase(h.adminURL, h.template))
	if err != nil {
		h.close()
		return nil, err
	}
	_, err = migrations.Up(ctx, pool, slog.New(slog.DiscardHandler))
	pool.Close()
	if err != nil {
		h.close()
		return nil, err
	}
	return h, nil
}

func (h *harness) exec(ctx context.Context, sql string) error {
	conn, err := pgx.Connect(ctx, h.adminURL)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql)
	return err
}

func (h *harness) close() {
	if h.server == nil {
		if h.template != "" {
			_ = h.exec(context.Background(), fmt.Sprintf("DROP DATABASE IF EXISTS %s WITH (FORCE)", h.template))
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = h.server.Stop(ctx)
	os.RemoveAll(h.dir)
}

// withDatabase points a connection string (URL or keyword/value) at another
// database on the same server.
func withDatabase(connString, db string) string {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		u, err := url.Parse(connString)
		if err != nil {
			panic(fmt.Sprintf("pgtest: bad connection URL: %v", err))
		}
		u.Path = "/" + db
		return u.String()
	}
	// In keyword/value form the last occurrence of a keyword wins.
	return connString + " dbname=" + db
}

func randomSuffix() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
