package migrations_test

import (
	"context"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/migrations"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// TestConcurrentStart plays several replicas starting together against one
// empty database: every migration is applied exactly once and nobody fails.
func TestConcurrentStart(t *testing.T) {
	url := pgtest.EmptyURL(t)
	ctx := context.Background()
	const replicas = 5
	applied := make([]int, replicas)
	errs := make([]error, replicas)
	var wg sync.WaitGroup
	for i := range replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pool, err := pgxpool.New(ctx, url)
			if err != nil {
				errs[i] = err
				return
			}
			defer pool.Close()
			applied[i], errs[i] = migrations.Up(ctx, pool, slog.New(slog.DiscardHandler))
		}()
	}
	wg.Wait()
	total := 0
	for i := range replicas {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		total += applied[i]
	}
	files, _ := filepath.Glob("*.sql") // tests run in the package directory
	if total != len(files) {
		t.Fatalf("applied %d migrations across replicas, want each of %d exactly once", total, len(files))
	}
	pool, _ := pgxpool.New(ctx, url)
	defer pool.Close()
	var n int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM goose_db_version WHERE version_id > 0").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != len(files) {
		t.Fatalf("goose_db_version has %d rows, want %d", n, len(files))
	}
}
