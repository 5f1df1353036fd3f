-- +goose Up

-- firmware_verdict_history records every flip of a learned verdict: flagged
-- when the analysis starts flagging a firmware, cleared when it stops (its
-- rate fell well below the thresholds, or its evidence aged out of the
-- window), with the rate, the baseline it was compared with and the verdict
-- as evidence (without sample events). The analysis keeps the newest 50 rows
-- per (model, firmware, flag) and deletes older ones in the same transaction.
CREATE TABLE firmware_verdict_history (
    id       bigserial        PRIMARY KEY,
    model    text             NOT NULL,
    firmware text             NOT NULL,
    flag     text             NOT NULL,
    at       timestamptz      NOT NULL DEFAULT now(),
    change   text             NOT NULL CHECK (change IN ('flagged', 'cleared')),
    rate     double precision NOT NULL,
    baseline double precision NOT NULL,
    evidence jsonb            NOT NULL
);
CREATE INDEX firmware_verdict_history_idx ON firmware_verdict_history (model, firmware, at DESC);
