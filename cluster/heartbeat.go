package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/advisory"
)

// Recorder takes connection events (fleet.Recorder).
type Recorder interface {
	Record(fleet.Event)
}

// Heartbeat says every Every that this replica is alive, and ends the
// sessions of replicas that stopped saying so: a replica killed, or whose
// machine is gone, records no disconnect for its devices, which would stay
// online on it until they connect again. Its devices are recorded as
// disconnected with reason replica_lost (the recorder applies it only to
// the session that was live there: a device already back on another replica
// has a newer epoch and stays online). At start it also ends its own node's
// sessions from before the start (a crash of this replica).
type Heartbeat struct {
	Pool     *pgxpool.Pool
	Node     string
	Recorder Recorder
	Clock    func() time.Time // session epochs' clock (Clock.Now)
	// StartedEpoch is a session epoch taken before this replica's broker
	// accepted its first connection: sessions of this node older than it
	// are a previous run's. 0: when Run starts.
	StartedEpoch int64
	Log          *slog.Logger
	// Every is the heartbeat period (default 2s); DeadAfter the silence
	// after which a replica is lost (default 15s: several missed beats and
	// more than a slow database's hiccup).
	Every, DeadAfter time.Duration
}

// lostSweepLock keeps two replicas from recording the same lost sessions.
const lostSweepLock = advisory.LostSweep

// Run beats and sweeps until ctx ends.
func (h *Heartbeat) Run(ctx context.Context) {
	if h.Every <= 0 {
		h.Every = 2 * time.Second
	}
	if h.DeadAfter <= 0 {
		h.DeadAfter = 15 * time.Second
	}
	if h.Log == nil {
		h.Log = slog.New(slog.DiscardHandler)
	}
	started := h.StartedEpoch
	if started == 0 {
		started = h.Clock().UnixMicro()
	}
	if err := h.endOwnStale(ctx, started); err != nil && ctx.Err() == nil {
		h.Log.Warn("cannot end the sessions this replica held before it started", "err", err)
	}
	t := time.NewTicker(h.Every)
	defer t.Stop()
	for {
		if err := h.beat(ctx); err != nil && ctx.Err() == nil {
			h.Log.Warn("heartbeat not written", "err", err)
		}
		if err := h.sweep(ctx); err != nil && ctx.Err() == nil {
			h.Log.Warn("cannot look for lost replicas", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (h *Heartbeat) beat(ctx context.Context) error {
	_, err := h.Pool.Exec(ctx, `INSERT INTO replica_heartbeats (node, seen_at) VALUES ($1, now())
		ON CONFLICT (node) DO UPDATE SET seen_at = now()`, h.Node)
	return err
}

// endOwnStale ends the sessions recorded on this node before it started.
func (h *Heartbeat) endOwnStale(ctx context.Context, startedEpoch int64) error {
	n, err := h.endSessions(ctx, h.Node, startedEpoch, "this replica restarted without ending them")
	if n > 0 {
		h.Log.Info("ended the sessions this replica held before it restarted", "sessions", n)
	}
	return err
}

// sweep ends the sessions of every replica silent for DeadAfter.
func (h *Heartbeat) sweep(ctx context.Context) error {
	conn, err := h.Pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	var locked bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, int64(lostSweepLock)).Scan(&locked); err != nil || !locked {
		return err
	}
	defer conn.Exec(context.Background(), `SELECT pg_advisory_unlock($1)`, int64(lostSweepLock))
	rows, err := conn.Query(ctx, `SELECT node, seen_at FROM replica_heartbeats
		WHERE seen_at < now() - make_interval(secs => $1) AND node <> $2`, h.DeadAfter.Seconds(), h.Node)
	if err != nil {
		return err
	}
	type lost struct {
		node string
		seen time.Time
	}
	var nodes []lost
	for rows.Next() {
		var l lost
		if err := rows.Scan(&l.node, &l.seen); err != nil {
			rows.Close()
			return err
		}
		nodes = append(nodes, l)
	}
	rows.Close()
	for _, l := range nodes {
		why := fmt.Sprintf("replica %s stopped answering (last heard from at %s)", l.node, l.seen.UTC().Format(time.RFC3339))
		n, err := h.endSessions(ctx, l.node, 0, why)
		if err != nil {
			return err
		}
		if n > 0 {
			h.Log.Warn("ended the sessions of a lost replica", "lost_node", l.node, "sessions", n, "last_heard", l.seen)
		}
	}
	return nil
}

// endSessions records the end of the sessions shown online on a node (those
// older than beforeEpoch when it is not 0).
func (h *Heartbeat) endSessions(ctx context.Context, node string, beforeEpoch int64, why string) (int, error) {
	rows, err := h.Pool.Query(ctx, `SELECT id, session_epoch, firmware, model, protocol_version, keepalive_requested, keepalive_effective, remote_addr, listener
		FROM devices WHERE online AND broker_node = $1 AND ($2::bigint = 0 OR session_epoch < $2::bigint) LIMIT 50000`, node, beforeEpoch)
	if err != nil {
		return 0, err
	}
	defer rows.Close()
	now := time.Now()
	n := 0
	for rows.Next() {
		e := fleet.Event{ID: fleet.NewEventID(now), At: now, Kind: fleet.KindDisconnect, Reason: fleet.ReasonReplicaLost, Detail: why, BrokerNode: node}
		var proto int16
		if err := rows.Scan(&e.DeviceID, &e.SessionEpoch, &e.Firmware, &e.Model, &proto, &e.KeepaliveRequested, &e.KeepaliveEffective, &e.RemoteAddr, &e.Listener); err != nil {
			return n, err
		}
		e.ProtocolVersion = fleet.Protocol(proto)
		h.Recorder.Record(e)
		n++
	}
	return n, rows.Err()
}
