-- +goose Up

-- policy is the operator's document of compatibility rules, keepalive policy
-- and verdict thresholds (GET/PUT /api/v1/compat/rules): one row.
CREATE TABLE policy (
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    doc        jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- firmware_verdicts holds what the fleet learned about a firmware (learned,
-- with the evidence that convinced it) and what an operator decided about it
-- (confirmed: flagged whatever the evidence; overridden: never flagged).
-- A learned verdict whose evidence aged out keeps its row with learned=false.
CREATE TABLE firmware_verdicts (
    model      text        NOT NULL,
    firmware   text        NOT NULL,
    flag       text        NOT NULL,
    learned    boolean     NOT NULL DEFAULT false,
    decision   text        NOT NULL DEFAULT '' CHECK (decision IN ('', 'confirmed', 'overridden')),
    evidence   jsonb,
    learned_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, firmware, flag)
);

-- Whether each device's firmware fits the fleet, and why not; kept current by
-- the analysis loop so that device lists can filter on it.
ALTER TABLE devices
    ADD COLUMN incompatible      boolean NOT NULL DEFAULT false,
    ADD COLUMN incompatibilities jsonb   NOT NULL DEFAULT '[]';
CREATE INDEX devices_incompatible_idx ON devices (id) WHERE incompatible;

-- Pairs a session's connect with its disconnect.
CREATE INDEX device_events_session_idx ON device_events (device_id, session_epoch) WHERE kind IN ('connect', 'disconnect');
