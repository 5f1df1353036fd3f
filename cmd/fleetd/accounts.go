package main

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/auth"
	"github.com/fleetd/fleetd/web"
)

// startAccounts mounts users, API keys, console sessions and the audit log
// before any other component mounts its routes, so that no state-changing
// request is served unaudited, and runs the loop that prunes the audit log
// (after -audit-retention), ended sessions, and keys revoked or expired
// longer ago than that. Every replica runs it; the batched deletes do not
// mind each other.
func startAccounts(cfg Config, logger *slog.Logger, lc *lifecycle, api *web.Server, pool *pgxpool.Pool) {
	logger = logger.With("component", "accounts")
	store := auth.NewStore(pool, auth.Options{SessionIdle: cfg.SessionIdle, SessionMax: cfg.SessionMax})
	api.MountAccounts(store)
	keep := cfg.auditRetention()
	bg := newLoops(lc)
	bg.start("audit retention", func(ctx context.Context) {
		t := time.NewTicker(time.Hour)
		defer t.Stop()
		for {
			n, err := store.PruneAudit(ctx, keep)
			if err == nil {
				err = store.PruneSessions(ctx, keep)
			}
			switch {
			case err != nil && ctx.Err() == nil:
				logger.Warn("audit log and sessions not pruned; trying again in an hour", "err", err)
			case n > 0:
				logger.Info("audit log pruned", "entries", n, "retention", keep.String())
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	})
}

// secureCookies reports whether the console's session cookie must be
// Secure on every request: the public URL is https (TLS ends in front of
// fleetd).
func secureCookies(cfg Config) bool { return strings.HasPrefix(cfg.PublicURL, "https://") }
