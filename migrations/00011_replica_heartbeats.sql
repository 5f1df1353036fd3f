-- +goose Up

-- replica_heartbeats holds when each replica (by node name) last said it is
-- alive. A replica that stops answering (killed, its machine gone) leaves
-- devices marked online on it; the others see its heartbeat age and record
-- those sessions' end as replica_lost.
CREATE TABLE replica_heartbeats (
    node    text        PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now()
);

-- The sessions a lost replica held: found without scanning every device.
CREATE INDEX devices_online_node_idx ON devices (broker_node) WHERE online;
