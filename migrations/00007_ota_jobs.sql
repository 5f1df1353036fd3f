-- +goose Up

-- ota_jobs holds one row per OTA attempt: the forward job every selected
-- device gets, and the rollback job of a device a rollback sends back. Its id
-- is stored, travels in the job message and comes back in the device's status
-- reports, so no report is ever matched by parsing an id (device ids may hold
-- ':'). campaign_devices keeps the selection: order, stage, version before.
CREATE TABLE ota_jobs (
    id            text        PRIMARY KEY,
    campaign_id   text        NOT NULL,
    device_id     text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('forward', 'rollback')),
    state         text        NOT NULL DEFAULT 'pending',
    progress      integer     NOT NULL DEFAULT 0,
    error         text        NOT NULL DEFAULT '',
    dispatched_at timestamptz,
    delivered_at  timestamptz,
    finished_at   timestamptz,
    UNIQUE (campaign_id, device_id, kind),
    FOREIGN KEY (campaign_id, device_id) REFERENCES campaign_devices (campaign_id, device_id) ON DELETE CASCADE
);
CREATE INDEX ota_jobs_device_idx ON ota_jobs (device_id) WHERE state IN ('dispatched', 'downloading', 'verifying', 'installing', 'rebooting');
CREATE INDEX ota_jobs_campaign_idx ON ota_jobs (campaign_id, kind, state);

-- Existing jobs move over. Before this, a rollback reused the forward job's
-- progress, error and times; the forward job of a rolled-back device had
-- succeeded (only succeeded devices are rolled back).
INSERT INTO ota_jobs (id, campaign_id, device_id, kind, state, progress, error, dispatched_at, delivered_at, finished_at)
SELECT 'job_' || replace(gen_random_uuid()::text, '-', ''), campaign_id, device_id, 'forward',
       CASE WHEN rollback_state = '' THEN state ELSE 'succeeded' END,
       CASE WHEN rollback_state = '' THEN progress ELSE 100 END,
       CASE WHEN rollback_state = '' THEN error ELSE '' END,
       CASE WHEN rollback_state = '' THEN dispatched_at END,
       CASE WHEN rollback_state = '' THEN delivered_at END,
       CASE WHEN rollback_state = '' THEN finished_at END
FROM campaign_devices;
INSERT INTO ota_jobs (id, campaign_id, device_id, kind, state, progress, error, dispatched_at, delivered_at, finished_at)
SELECT 'job_' || replace(gen_random_uuid()::text, '-', ''), campaign_id, device_id, 'rollback',
       rollback_state, progress, error, dispatched_at, delivered_at, finished_at
FROM campaign_devices WHERE rollback_state <> '';

DROP INDEX campaign_devices_device_idx;
DROP INDEX campaign_devices_stage_idx;
CREATE INDEX campaign_devices_stage_idx ON campaign_devices (campaign_id, stage, position);
ALTER TABLE campaign_devices DROP COLUMN state, DROP COLUMN progress, DROP COLUMN error, DROP COLUMN dispatched_at,
    DROP COLUMN delivered_at, DROP COLUMN finished_at, DROP COLUMN rollback_state;
