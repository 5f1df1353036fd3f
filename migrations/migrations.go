// Package migrations holds fleetd's forward-only SQL migrations, embedded in
// the binary, and applies them at start.
package migrations

import (
	"context"
	"embed"
	"fmt"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/fleetd/fleetd/internal/advisory"
)

//go:embed *.sql
var files embed.FS

// lockID is the advisory lock that serialises migrations across replicas
// so several fleetd processes starting together against one database apply
// each migration exactly once.
const lockID = int64(advisory.Migrations)

// Up applies every pending migration under a session-level advisory lock and
// returns how many it applied. A replica that finds the lock taken polls once a
// second, for up to five minutes, and then finds nothing left to do.
func Up(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) (int, error) {
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	locker, err := lock.NewPostgresSessionLocker(lock.WithLockID(lockID), lock.WithLockTimeout(1, 300))
	if err != nil {
		return 0, err
	}
	provider, err := goose.NewProvider(goose.DialectPostgres, db, files,
		goose.WithSessionLocker(locker), goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return 0, fmt.Errorf("load migrations: %w", err)
	}
	results, err := provider.Up(ctx)
	if err != nil {
		return 0, fmt.Errorf("apply migrations: %w", err)
	}
	for _, r := range results {
		logger.Info("applied migration", "version", r.Source.Version, "file", r.Source.Path, "duration", r.Duration.String())
	}
	return len(results), nil
}
