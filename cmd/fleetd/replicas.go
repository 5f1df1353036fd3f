package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/cluster"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/web"
)

// Kinds of signals between replicas (see package cluster). Each replica
// applies the others' signals; its own changes it applied already.
const (
	signalCredential = "credential" // a device's credential changed; revoked: end its session
	signalPolicy     = "policy"     // the policy document changed
	signalPresence   = "presence"   // a session started or ended (live streams; a newer session takes over)
	signalCampaign   = "campaign"   // a campaign changed (live streams)
)

type credentialSignal struct {
	DeviceID string                 `json:"d"`
	Change   fleet.CredentialChange `json:"c"`
}

// presenceSignal is the part of a connect or disconnect event that live
// streams show, and the epoch a takeover needs.
type presenceSignal struct {
	DeviceID string         `json:"d"`
	Kind     fleet.Kind     `json:"k"`
	Reason   fleet.Reason   `json:"r,omitempty"`
	Firmware string         `json:"f,omitempty"`
	Protocol fleet.Protocol `json:"p,omitempty"`
	Epoch    int64          `json:"e"`
	At       time.Time      `json:"t"`
}

// replicaSignals joins this replica to the others on its database: one bus
// and the database's clock.
type replicaSignals struct {
	bus   *cluster.Bus
	clock *cluster.Clock
	pool  *pgxpool.Pool // their own: see clusterConns
	log   *slog.Logger
}

// clusterConns is the size of the replica signals' own pool: sending
// signals, heartbeats and the lost-replica sweep must not queue behind the
// registry's queries when a connect storm fills the main pool, or a replica
// would stop telling the others anything and look dead to them.
const clusterConns = 3

func newReplicaSignals(ctx context.Context, cfg Config, main *pgxpool.Pool, logger *slog.Logger, reg prometheus.Registerer, lc *lifecycle) (*replicaSignals, error) {
	pcfg := main.Config().Copy()
	pcfg.MaxConns, pcfg.MinConns = clusterConns, 1
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("connect for the replica signals: %w", err)
	}
	lc.onStop("replica signals' database pool", func(context.Context) error { pool.Close(); return nil })
	clock, err := cluster.NewClock(ctx, pool)
	if err != nil {
		return nil, err
	}
	log := logger.With("component", "cluster")
	if off := clock.Offset(); off > time.Second || off < -time.Second {
		log.Warn("this machine's clock is far from the database's; session epochs follow the database", "offset", off.String())
	}
	return &replicaSignals{bus: cluster.NewBus(pool, cfg.Node, log, reg), clock: clock, pool: pool, log: log}, nil
}

// observer is the recorder's Observe: every event goes to this replica's
// live streams, and sessions starting and ending go to the other replicas'.
func (rs *replicaSignals) observer(hub *web.Hub) func(fleet.Event) {
	return func(e fleet.Event) {
		hub.Observe(e)
		if e.Kind == fleet.KindConnect || e.Kind == fleet.KindDisconnect {
			rs.bus.Enqueue(signalPresence, presenceSignal{DeviceID: e.DeviceID, Kind: e.Kind, Reason: e.Reason,
				Firmware: e.Firmware, Protocol: e.ProtocolVersion, Epoch: e.SessionEpoch, At: e.At})
		}
	}
}

// campaignChanged is the campaigns' OnChange: this replica's live streams,
// and the others'.
func (rs *replicaSignals) campaignChanged(hub *web.Hub) func(string) {
	return func(id string) {
		hub.CampaignChanged(id)
		rs.bus.Enqueue(signalCampaign, id)
	}
}

// start registers what this replica does with the others' signals, sends
// its own, and starts listening; the bus stops after the broker (its
// kicks) and before the database.
func (rs *replicaSignals) start(ctx context.Context, svc *fleet.Service, b *broker.Broker, hub *web.Hub, lc *lifecycle) error {
	svc.OnCredentialChange(func(id string, change fleet.CredentialChange) {
		// Sent at once, not batched: a revoked token must stop working
		// everywhere within a second; and retried, since a lost signal
		// would leave it working elsewhere until the cache entry expires.
		sig := credentialSignal{DeviceID: id, Change: change}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := rs.bus.Publish(ctx, signalCredential, sig); err != nil {
			go rs.retryCredential(sig, err)
		}
	})
	svc.OnPolicyChange(func() { rs.bus.Enqueue(signalPolicy, struct{}{}) })

	rs.bus.Handle(signalCredential, each(rs.log, func(c credentialSignal) { svc.CredentialChanged(c.DeviceID, c.Change) }))
	rs.bus.Handle(signalPolicy, func([]json.RawMessage) { go svc.PolicyChanged(context.Background()) })
	rs.bus.Handle(signalPresence, each(rs.log, func(p presenceSignal) {
		if p.Kind == fleet.KindConnect {
			b.TakeOverRemote(p.DeviceID, p.Epoch)
		}
		hub.Observe(fleet.Event{DeviceID: p.DeviceID, Kind: p.Kind, Reason: p.Reason, Firmware: p.Firmware,
			ProtocolVersion: p.Protocol, SessionEpoch: p.Epoch, At: p.At})
	}))
	rs.bus.Handle(signalCampaign, each(rs.log, hub.CampaignChanged))
	rs.bus.OnResync(func(ctx context.Context) {
		if n, err := svc.ReloadCache(ctx); err != nil {
			rs.log.Warn("cannot reload the credential cache after the listener came back; entries expire instead", "err", err)
		} else {
			rs.log.Info("credential cache reloaded", "devices", n)
		}
	})
	if err := rs.bus.Start(ctx); err != nil {
		return err
	}
	lc.onStop("replica signals", rs.bus.Close)
	return nil
}

// retryCredential sends a credential signal whose first send failed (a
// database too busy to take it within 5 s), with backoff, for about a minute.
func (rs *replicaSignals) retryCredential(sig credentialSignal, err error) {
	for wait := 250 * time.Millisecond; wait < 32*time.Second; wait *= 2 {
		time.Sleep(wait)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = rs.bus.Publish(ctx, signalCredential, sig)
		cancel()
		if err == nil {
			return
		}
	}
	rs.log.Warn("other replicas not told of a credential change; their cache entries expire (credential-cache-ttl)", "device_id", sig.DeviceID, "err", err)
}

// each decodes every item of another replica's message and applies it.
func each[T any](log *slog.Logger, apply func(T)) cluster.Handler {
	return func(items []json.RawMessage) {
		for _, raw := range items {
			var v T
			if err := json.Unmarshal(raw, &v); err != nil {
				log.Warn("ignored a malformed signal from another replica", "err", err)
				continue
			}
			apply(v)
		}
	}
}
