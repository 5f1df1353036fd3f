package main

import (
	"context"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/devconfig"
	"github.com/fleetd/fleetd/web"
)

// signalConfig is the replica signal of devices whose effective desired
// configuration got a new version: the replica holding a device's session
// publishes it. Documents do not travel (they may be larger than a
// signal): each replica reads them from the database.
const signalConfig = "config"

// maxSignalIDs bounds the device ids of one config signal item, so that an
// item fits in a signal however long the ids are (128 bytes at most).
const maxSignalIDs = 48

// startDeviceConfig runs desired and reported configuration: the API writes
// layers and devices' own layers; the service re-resolves the devices a
// change touched and publishes new versions, retained, to the sessions this
// replica holds, and tells the other replicas, which publish to theirs; a
// device that subscribes to devices/{id}/config/desired is sent its
// document from the database, wherever the change was made; reports on
// devices/{id}/config/reported are validated and stored.
// It is called before the bus and the broker start, so that its handlers
// are registered before either delivers anything.
func startDeviceConfig(cfg Config, logger *slog.Logger, lc *lifecycle, api *web.Server, pool *pgxpool.Pool, reg prometheus.Registerer,
	b *broker.Broker, rs *replicaSignals, events devconfig.EventSink) *devconfig.Service {
	logger = logger.With("component", "config")
	svc := devconfig.NewService(devconfig.NewStore(pool, devconfig.Limits{}), b, events, devconfig.Options{
		Node: cfg.Node, Now: rs.clock.Now, Logger: logger, Registerer: reg,
	})
	svc.OnChange(func(ids []string) {
		for len(ids) > 0 {
			n := min(len(ids), maxSignalIDs)
			rs.bus.Enqueue(signalConfig, ids[:n])
			ids = ids[n:]
		}
	})
	rs.bus.Handle(signalConfig, each(rs.log, svc.Changed))
	// Signals sent while this replica was not listening are lost: the
	// devices listening here get their documents again.
	rs.bus.OnResync(func(context.Context) { svc.Resync() })
	b.HandleSession(devconfig.ReportedSub, func(s broker.Session, payload []byte) error {
		return svc.HandleReport(devconfig.Session{DeviceID: s.DeviceID, Epoch: s.Epoch, Firmware: s.Firmware, Model: s.Model}, payload)
	})
	// Devices subscribe to devices/{id}/config/desired (the protocol); a
	// wildcard inside config/ works too.
	for _, sub := range []string{devconfig.DesiredSub, "config/#", "config/+"} {
		b.OnSubscribe(sub, svc.DeviceListening)
	}
	api.MountConfig(svc)
	newLoops(lc).start("config", svc.Run)
	return svc
}
