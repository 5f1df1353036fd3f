-- +goose Up

-- devices is the fleet registry: one row per device id ever registered. A
-- decommissioned device keeps its row (state 'decommissioned', no credential)
-- so that its history stays readable and later connects are refused as
-- "decommissioned" rather than "unknown"; registering the id again reactivates
-- the row with a new token.
CREATE TABLE devices (
    id                  text PRIMARY KEY,
    model               text        NOT NULL DEFAULT '',
    tags                text[]      NOT NULL DEFAULT '{}',
    state               text        NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'decommissioned')),
    -- HMAC-SHA256(pepper, token); NULL once decommissioned.
    token_hash          bytea,
    firmware            text        NOT NULL DEFAULT '',
    protocol_version    smallint    NOT NULL DEFAULT 0,
    online              boolean     NOT NULL DEFAULT false,
    -- session_epoch identifies the live (or last) session; a disconnect only
    -- marks the device offline when it carries the current epoch, so that a
    -- takeover's late disconnect cannot mark the new session offline.
    session_epoch       bigint      NOT NULL DEFAULT 0,
    connected_at        timestamptz,
    disconnected_at     timestamptz,
    last_seen           timestamptz,
    last_disconnect     text        NOT NULL DEFAULT '',
    keepalive_requested integer     NOT NULL DEFAULT 0,
    keepalive_effective integer     NOT NULL DEFAULT 0,
    remote_addr         text        NOT NULL DEFAULT '',
    tls_version         text        NOT NULL DEFAULT '',
    listener            text        NOT NULL DEFAULT '',
    broker_node         text        NOT NULL DEFAULT '',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    decommissioned_at   timestamptz
);

CREATE INDEX devices_model_idx ON devices (model);
CREATE INDEX devices_firmware_idx ON devices (firmware);
CREATE INDEX devices_online_idx ON devices (online) WHERE state = 'active';

-- device_events records every connection attempt and every session end. The
-- broker assigns the id when the event happens, so a batch replayed from the
-- spool after a database outage is written once (ON CONFLICT DO NOTHING).
-- device_id has no foreign key: attempts by unknown ids are recorded too.
CREATE TABLE device_events (
    id                  uuid        PRIMARY KEY,
    device_id           text        NOT NULL,
    at                  timestamptz NOT NULL,
    kind                text        NOT NULL CHECK (kind IN ('connect', 'disconnect', 'refused', 'acl_denied', 'birth')),
    reason              text        NOT NULL DEFAULT '',
    detail              text        NOT NULL DEFAULT '',
    -- firmware and model as known when the event happened (from the birth
    -- message or MQTT 5 user properties), so disconnects can be tied to firmware.
    firmware            text        NOT NULL DEFAULT '',
    model               text        NOT NULL DEFAULT '',
    session_epoch       bigint      NOT NULL DEFAULT 0,
    protocol_version    smallint    NOT NULL DEFAULT 0,
    keepalive_requested integer     NOT NULL DEFAULT 0,
    keepalive_effective integer     NOT NULL DEFAULT 0,
    clean_start         boolean     NOT NULL DEFAULT false,
    remote_addr         text        NOT NULL DEFAULT '',
    tls_version         text        NOT NULL DEFAULT '',
    listener            text        NOT NULL DEFAULT '',
    broker_node         text        NOT NULL DEFAULT '',
    -- PINGREQs received during the session, and how long the device had been
    -- silent when the session ended (disconnect events only): together they
    -- tell a firmware that never pings from a path that cuts idle connections.
    pings               integer     NOT NULL DEFAULT 0,
    idle_ms             integer     NOT NULL DEFAULT 0
);

CREATE INDEX device_events_device_at_idx ON device_events (device_id, at DESC, id DESC);
CREATE INDEX device_events_at_idx ON device_events (at);
