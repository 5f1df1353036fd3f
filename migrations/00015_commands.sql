-- +goose Up

-- commands holds one row per command an operator sent to a device
-- (POST /api/v1/devices/{id}/commands). Its id travels in the command message
-- (and, for MQTT 5, in its Correlation Data) and comes back in the device's
-- response. A command is pending while queued (not yet handed to a session
-- that listens) or delivered (handed over, no answer yet); it finishes as
-- succeeded or failed (the device's answer), timed_out (delivered, no answer
-- within timeout) or expired (still queued at expires_at). Finished commands
-- are pruned after the retention, and past the newest N per device. Params
-- and result are json, not jsonb: they are stored and returned byte for byte
-- as compacted at the edge, never queried into.
CREATE TABLE commands (
    id           text        PRIMARY KEY,
    device_id    text        NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name         text        NOT NULL,
    params       json        NOT NULL DEFAULT '{}',
    state        text        NOT NULL DEFAULT 'queued'
                             CHECK (state IN ('queued', 'delivered', 'succeeded', 'failed', 'timed_out', 'expired')),
    result       json,
    timeout_ms   bigint      NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    delivered_at timestamptz,
    deadline_at  timestamptz, -- delivered_at + timeout: past it, timed_out
    finished_at  timestamptz,
    updated_at   timestamptz NOT NULL
);

-- A device's commands, newest first (the API's listing and the per-device cap).
CREATE INDEX commands_device_idx ON commands (device_id, created_at DESC, id DESC);
-- The pending ones: redelivery, the per-device cap and the sweep.
CREATE INDEX commands_pending_idx ON commands (device_id) WHERE state IN ('queued', 'delivered');
CREATE INDEX commands_expiry_idx ON commands (expires_at) WHERE state = 'queued';
CREATE INDEX commands_deadline_idx ON commands (deadline_at) WHERE state = 'delivered';
-- Retention: finished commands by age.
CREATE INDEX commands_finished_idx ON commands (finished_at) WHERE finished_at IS NOT NULL;
