package main

import (
	"context"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/telemetry"
	"github.com/fleetd/fleetd/web"
)

// startTelemetry stores what devices publish on devices/{id}/telemetry: the
// broker hands each message to the ingest (rate, bounds), which queues it for
// the writer (a row per message); the rollup job computes the rollups, latest
// values and links from those rows; retention keeps each tier within its
// setting; the API reads it.
// It is called before the broker starts, so that its stop steps run after
// the broker's: the writer stops once no message can arrive, and writes what
// is queued. It returns the ingest, which knows each session's radio link.
func startTelemetry(cfg Config, logger *slog.Logger, lc *lifecycle, api *web.Server, pool *pgxpool.Pool, reg prometheus.Registerer, b *broker.Broker, events telemetry.EventSink) *telemetry.Ingest {
	logger = logger.With("component", "telemetry")
	store := telemetry.NewStore(pool)
	w := telemetry.NewWriter(store, telemetry.WriterOptions{QueueSize: cfg.TelemetryQueue, Logger: logger, Registerer: reg})
	lc.onStop("telemetry writer", w.Close)
	in := telemetry.NewIngest(w, events, telemetry.IngestOptions{Rate: cfg.TelemetryRate, Burst: cfg.TelemetryBurst,
		Node: cfg.Node, Logger: logger, Registerer: reg})
	b.HandleSession("telemetry", func(s broker.Session, payload []byte) error {
		return in.Handle(telemetry.Session{DeviceID: s.DeviceID, Epoch: s.Epoch, Firmware: s.Firmware, Model: s.Model}, payload)
	})
	ret := &telemetry.Retention{Raw: cfg.TelemetryRawRetention, Minute: cfg.TelemetryMinuteRetention, Hour: cfg.TelemetryHourRetention,
		Logger: logger, Registerer: reg}
	bg := newLoops(lc)
	bg.start("telemetry sweep", in.Run)
	bg.start("telemetry retention", func(ctx context.Context) { ret.Run(ctx, store) })
	roll := &telemetry.RollupJob{Logger: logger, Registerer: reg}
	bg.start("telemetry rollup", func(ctx context.Context) { roll.Run(ctx, store) })
	api.MountTelemetry(store)
	return in
}
