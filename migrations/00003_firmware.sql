-- +goose Up

-- firmware holds uploaded images: the bytes live in content-addressed files
-- under the data dir (by SHA-256); this is their record.
CREATE TABLE firmware (
    id         text        PRIMARY KEY,
    version    text        NOT NULL,
    models     text[]      NOT NULL,
    sha256     text        NOT NULL,
    size       bigint      NOT NULL,
    -- base64 ed25519 signature of the raw SHA-256 digest, and whose key made it
    signature  text        NOT NULL,
    signed_by  text        NOT NULL,
    notes      text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One version per model: a second upload of 1.2.0 for gw-100 is a conflict.
CREATE TABLE firmware_models (
    firmware_id text NOT NULL REFERENCES firmware (id) ON DELETE CASCADE,
    model       text NOT NULL,
    version     text NOT NULL,
    PRIMARY KEY (model, version)
);

CREATE TABLE campaigns (
    id            text        PRIMARY KEY,
    name          text        NOT NULL,
    firmware_id   text        NOT NULL REFERENCES firmware (id),
    version       text        NOT NULL,
    spec          jsonb       NOT NULL,
    state         text        NOT NULL,
    stage         integer     NOT NULL DEFAULT 0,
    stage_done_at timestamptz,
    total         integer     NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- campaign_devices is one row per (campaign, device): the unique key that
-- makes dispatch exactly once across restarts. position is the deterministic
-- order of selection; stage is set when the device is assigned to a stage.
CREATE TABLE campaign_devices (
    campaign_id    text        NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    device_id      text        NOT NULL,
    position       integer     NOT NULL,
    stage          integer,
    from_version   text        NOT NULL DEFAULT '',
    state          text        NOT NULL DEFAULT 'pending',
    progress       integer     NOT NULL DEFAULT 0,
    error          text        NOT NULL DEFAULT '',
    dispatched_at  timestamptz,
    delivered_at   timestamptz,
    finished_at    timestamptz,
    -- the rollback job of a device this campaign changed
    rollback_state text        NOT NULL DEFAULT '',
    PRIMARY KEY (campaign_id, device_id)
);
CREATE INDEX campaign_devices_device_idx ON campaign_devices (device_id) WHERE state IN ('dispatched', 'downloading', 'verifying', 'installing', 'rebooting');
CREATE INDEX campaign_devices_stage_idx ON campaign_devices (campaign_id, stage, state);

-- campaign_history is the audit trail: who did what, and every gate decision
-- with its numbers.
CREATE TABLE campaign_history (
    id          bigserial   PRIMARY KEY,
    campaign_id text        NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    action      text        NOT NULL,
    detail      jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX campaign_history_campaign_idx ON campaign_history (campaign_id, id);
