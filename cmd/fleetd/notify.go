package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/notify"
	"github.com/fleetd/fleetd/web"
)

// startNotifications mounts the webhook API and runs this replica's
// deliverer (every replica runs one; each delivery attempt is claimed by
// one of them), the offline watch (a round by one replica at a time), and
// the watch that tells when this replica's recorder falls behind and
// catches up. The other notifications are written by the
// transactions that make the changes they tell of (see package notify).
func startNotifications(cfg Config, logger *slog.Logger, lc *lifecycle, api *web.Server, pool *pgxpool.Pool, reg prometheus.Registerer,
	recorderReady func(context.Context) error) {
	logger = logger.With("component", "webhooks")
	api.MountWebhooks(notify.NewStore(pool))
	d := notify.NewDeliverer(pool, notify.Options{
		Node: cfg.Node, Version: version, Timeout: cfg.WebhookTimeout,
		RetryMin: cfg.WebhookRetryMin, RetryMax: cfg.WebhookRetryMax,
		MaxAttempts: cfg.WebhookMaxAttempts, DisableAfter: cfg.WebhookDisableAfter,
		Retention: cfg.NotificationRetention, Logger: logger, Registerer: reg,
	})
	bg := newLoops(lc)
	bg.start("webhook deliveries", d.Run)
	if cfg.NotifyOfflineAfter > 0 {
		w := notify.NewOfflineWatch(pool, notify.OfflineOptions{After: cfg.NotifyOfflineAfter, ModelShare: cfg.NotifyModelOfflineShare,
			MinModelDevices: cfg.NotifyModelOfflineMinDevices, Logger: logger})
		// A round every quarter of the threshold (1 s to 30 s): a device is
		// told of at most that late.
		every := min(max(cfg.NotifyOfflineAfter/4, time.Second), 30*time.Second)
		bg.start("offline watch", func(ctx context.Context) { w.Run(ctx, every) })
	}
	bg.start("recorder watch", func(ctx context.Context) { watchRecorder(ctx, cfg.Node, recorderReady, pool, logger, 5*time.Second) })
}

// watchRecorder publishes recorder.behind when this replica's recorder
// stops being ready (events wait for the database too long, or the spool is
// full) and recorder.caught_up when it is ready again. A notification that
// cannot be written (the database is what is away, most likely) is tried
// again at the next check, so the change is told once the database is back.
func watchRecorder(ctx context.Context, node string, ready func(context.Context) error, pool *pgxpool.Pool, logger *slog.Logger, every time.Duration) {
	behind := false
	var since time.Time
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := ready(ctx)
		now := err != nil
		if now == behind {
			continue
		}
		if now && since.IsZero() {
			since = time.Now()
		}
		typ, payload := notify.RecorderCaughtUp, map[string]any{"node": node, "behind_s": int(time.Since(since).Seconds())}
		if now {
			typ, payload = notify.RecorderBehind, map[string]any{"node": node, "reason": err.Error()}
		}
		if err := notify.Publish(ctx, pool, typ, payload); err != nil {
			logger.Warn("recorder notification not written yet, trying again", "type", typ, "error", err)
			continue
		}
		behind = now
		if !now {
			since = time.Time{}
		}
	}
}
