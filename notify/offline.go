package notify

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/advisory"
)

// OfflineOptions configure the offline watch.
type OfflineOptions struct {
	// After is how long a device must have been offline to be told of.
	After time.Duration
	// ModelShare (0..1] of a model's active devices offline longer than
	// After makes a model.offline notification; below it again,
	// model.back_online.
	ModelShare float64
	// MinModelDevices: a model with fewer active devices is not judged by
	// share (one of two devices is not half a fleet down).
	MinModelDevices int
	Logger          *slog.Logger
}

// OfflineWatch tells of devices, and shares of models, offline longer than
// a threshold. Any replica may run it; a round is made by one at a time
// (an advisory transaction lock) and its watermark and the models already
// told of are in the database, so rounds by several replicas neither
// repeat nor skip anything.
type OfflineWatch struct {
	pool *pgxpool.Pool
	opts OfflineOptions
}

// NewOfflineWatch returns a watch on pool.
func NewOfflineWatch(pool *pgxpool.Pool, opts OfflineOptions) *OfflineWatch {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.MinModelDevices <= 0 {
		opts.MinModelDevices = 1
	}
	return &OfflineWatch{pool: pool, opts: opts}
}

// Run makes a round every interval until ctx ends.
func (w *OfflineWatch) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if err := w.Round(ctx); err != nil && ctx.Err() == nil {
			w.opts.Logger.Warn("offline watch", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

const offlineWatermark = "devices.offline"

// Round tells of the devices whose disconnect became older than After
// since the last round (one devices.offline per model, with a sample of
// ids), and of the models whose offline share crossed ModelShare either
// way. The first round starts its watermark at now - After: devices
// offline before the watch began are not told of. Times are the
// database's, so replicas' clocks do not matter. A disconnect written to
// the database more than After after it happened (the recorder was behind,
// which recorder.behind tells) is older than the watermark by then and is
// not told of as devices.offline; it counts in the model shares.
func (w *OfflineWatch) Round(ctx context.Context) error {
	after := w.opts.After.Milliseconds()
	return pgx.BeginFunc(ctx, w.pool, func(tx pgx.Tx) error {
		var mine bool
		if err := tx.QueryRow(ctx, `SELECT pg_try_advisory_xact_lock($1)`, int64(advisory.NotifyOffline)).Scan(&mine); err != nil {
			return err
		}
		if !mine {
			return nil // another replica is making this round
		}
		var from, cut time.Time
		err := tx.QueryRow(ctx, `
			WITH cut AS (SELECT now() - $2 * interval '1 millisecond' AS at),
			ins AS (INSERT INTO notify_watermarks (name, at) SELECT $1, at FROM cut ON CONFLICT (name) DO NOTHING RETURNING at)
			SELECT coalesce((SELECT at FROM ins), (SELECT at FROM notify_watermarks WHERE name = $1)), (SELECT at FROM cut)`,
			offlineWatermark, after).Scan(&from, &cut)
		if err != nil {
			return fmt.Errorf("offline watermark: %w", err)
		}
		if cut.After(from) {
			if _, err := tx.Exec(ctx, `
				INSERT INTO notifications (type, payload)
				SELECT $4, jsonb_build_object('model', model, 'devices', count(*), 'sample', (array_agg(id ORDER BY id))[1:20],
					'offline_after_s', $3::bigint / 1000)
				FROM devices WHERE state = 'active' AND NOT online AND disconnected_at > $1 AND disconnected_at <= $2
				GROUP BY model ORDER BY model`, from, cut, after, string(DevicesOffline)); err != nil {
				return fmt.Errorf("devices offline: %w", err)
			}
			if _, err := tx.Exec(ctx, `UPDATE notify_watermarks SET at = $2 WHERE name = $1`, offlineWatermark, cut); err != nil {
				return err
			}
		}
		if w.opts.ModelShare <= 0 {
			return nil
		}
		// One pass over the active devices per round: the shares are of the
		// fleet as it is, not of its history.
		_, err = tx.Exec(ctx, `
			CREATE TEMP TABLE model_offline ON COMMIT DROP AS
			SELECT model, count(*)::int AS devices,
				(count(*) FILTER (WHERE NOT online AND disconnected_at <= $1))::int AS offline
			FROM devices WHERE state = 'active' GROUP BY model`, cut)
		if err != nil {
			return fmt.Errorf("model offline shares: %w", err)
		}
		if _, err := tx.Exec(ctx, `
			WITH down AS (
				INSERT INTO notify_models_offline (model, since, offline, devices)
				SELECT m.model, now(), m.offline, m.devices FROM model_offline m
				WHERE m.devices >= $1 AND m.offline >= $2::float8 * m.devices
				ON CONFLICT (model) DO NOTHING
				RETURNING model, offline, devices)
			INSERT INTO notifications (type, payload)
			SELECT $3, jsonb_build_object('model', model, 'offline', offline, 'devices', devices,
				'share', round(offline::numeric / devices, 3), 'offline_after_s', $4::bigint / 1000)
			FROM down ORDER BY model`, w.opts.MinModelDevices, w.opts.ModelShare, string(ModelOffline), after); err != nil {
			return fmt.Errorf("models offline: %w", err)
		}
		_, err = tx.Exec(ctx, `
			WITH up AS (
				DELETE FROM notify_models_offline n
				WHERE NOT EXISTS (SELECT 1 FROM model_offline m WHERE m.model = n.model AND m.devices >= $1 AND m.offline >= $2::float8 * m.devices)
				RETURNING n.model, n.since)
			INSERT INTO notifications (type, payload)
			SELECT $3, jsonb_build_object('model', up.model, 'offline', coalesce(m.offline, 0), 'devices', coalesce(m.devices, 0),
				'since', up.since)
			FROM up LEFT JOIN model_offline m ON m.model = up.model ORDER BY up.model`,
			w.opts.MinModelDevices, w.opts.ModelShare, string(ModelBackOnline))
		if err != nil {
			return fmt.Errorf("models back online: %w", err)
		}
		return nil
	})
}
