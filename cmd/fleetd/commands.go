package main

import (
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/cluster"
	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/web"
)

// signalCommand is the replica signal of a command's state change: the
// other replicas' live streams show it, and their requests waiting for it
// (GET ?wait=) look again.
const signalCommand = "command"

// signalBulkCommand is the replica signal of a bulk command's progress: the
// other replicas' live streams show it.
const signalBulkCommand = "bulk_command"

// startCommands runs single-device commands: the API stores a command and
// the router delivers it to the replica holding the device's session; the
// broker tells the service when a device subscribes to its command topics
// (commands waiting for it are sent) and hands it the device's answers on
// devices/{id}/cmd/response; the service's loop applies timeouts, expiry and
// retention. Bulk commands select their devices from the fleet and are
// paced by every replica's loop (each bulk stepped by one replica at a
// time); each device's command is delivered as a single one is. State
// changes and bulk progress go to this replica's live streams and, through
// the bus, to the others'.
// It is called before the bus and the broker start, so that its handlers
// are registered before either delivers anything.
func startCommands(cfg Config, logger *slog.Logger, lc *lifecycle, api *web.Server, pool *pgxpool.Pool, reg prometheus.Registerer,
	b *broker.Broker, router *cluster.Router, rs *replicaSignals, hub *web.Hub, events command.EventSink, devices command.Fleet) {
	logger = logger.With("component", "commands")
	svc := command.NewService(command.NewStore(pool), router, events, command.Options{
		Limits:    command.Limits{MaxPending: cfg.CommandMaxPending},
		Retention: cfg.CommandRetention, KeepPerDevice: cfg.CommandKeepPerDevice,
		Node: cfg.Node, Now: rs.clock.Now, Logger: logger, Registerer: reg,
	})
	svc.OnChange(func(c command.Change) {
		hub.CommandChanged(c)
		rs.bus.Enqueue(signalCommand, c)
	})
	rs.bus.Handle(signalCommand, each(rs.log, func(c command.Change) {
		svc.Changed(c.ID)
		hub.CommandChanged(c)
	}))
	b.HandleMessage("cmd/response", func(s broker.Session, m broker.Message) error {
		return svc.HandleResponse(command.Session{DeviceID: s.DeviceID, Epoch: s.Epoch, Firmware: s.Firmware, Model: s.Model},
			m.Payload, m.CorrelationData)
	})
	// Devices subscribe to devices/{id}/cmd/# (the protocol); a narrower
	// wildcard works too.
	b.OnSubscribe("cmd/#", svc.DeviceListening)
	b.OnSubscribe("cmd/+", svc.DeviceListening)
	bulks := command.NewBulks(svc, devices, command.BulkOptions{MaxDevices: cfg.CommandBulkMaxDevices, MaxRunning: cfg.CommandBulkMaxRunning})
	bulks.OnChange(func(c command.BulkChange) {
		hub.BulkCommandChanged(c)
		rs.bus.Enqueue(signalBulkCommand, c)
	})
	rs.bus.Handle(signalBulkCommand, each(rs.log, hub.BulkCommandChanged))
	api.MountCommands(svc)
	api.MountBulkCommands(bulks)
	loops := newLoops(lc)
	loops.start("commands", svc.Run)
	loops.start("command bulks", bulks.Run)
}
