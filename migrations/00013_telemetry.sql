-- +goose Up

-- telemetry_points holds every metric a device reported (telemetry.Parse
-- bounds them: at most 32 per message, names ^[a-z][a-z0-9_]{0,31}$, finite
-- values), for a short window (telemetry-raw-retention, default 48 h). It is
-- partitioned by day of `at` (UTC): fleetd creates the partitions ahead and
-- drops a whole day once it is older than the retention, never a mass DELETE.
-- `at` is when fleetd received the message, strictly increasing per device,
-- so the key is unique and a batch written twice (a retry after a lost
-- commit) inserts nothing the second time. device_id has no foreign key: a
-- decommissioned device's history stays until retention removes it.
CREATE TABLE telemetry_points (
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    at        timestamptz      NOT NULL,
    value     double precision NOT NULL,
    PRIMARY KEY (device_id, metric, at)
) PARTITION BY RANGE (at);

-- telemetry_minute and telemetry_hour are the rollups, one row per device,
-- metric and bucket, maintained by the writer in the batch's transaction
-- from the points it inserted (so a replayed batch adds nothing). last is the
-- value at last_at, the latest point of the bucket, so that batches combine in
-- any order. Retention deletes old rows in bounded batches by bucket, hence
-- its index. A row is updated by every batch that brings points of its
-- bucket, and no indexed column changes: with room left in each page
-- (fillfactor) those updates are HOT, touching no index.
CREATE TABLE telemetry_minute (
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    bucket    timestamptz      NOT NULL, -- the start of the minute (UTC)
    count     bigint           NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    sum       double precision NOT NULL,
    last      double precision NOT NULL,
    last_at   timestamptz      NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
) WITH (fillfactor = 70);
CREATE INDEX telemetry_minute_bucket_idx ON telemetry_minute (bucket);

-- The same by hour (bucket: the start of the hour, UTC).
CREATE TABLE telemetry_hour (LIKE telemetry_minute INCLUDING ALL) WITH (fillfactor = 70);

-- telemetry_latest is each device's latest value of each metric, which the
-- fleet view aggregates by firmware, model, channel or access point without
-- scanning history. Keyed by metric first: that view reads one metric. Every
-- message updates its rows, so `at` has no index (the update stays HOT);
-- retention finds silent devices' rows by a bounded scan of this table, which
-- holds one row per device and metric.
CREATE TABLE telemetry_latest (
    metric    text             NOT NULL,
    device_id text             NOT NULL,
    value     double precision NOT NULL,
    at        timestamptz      NOT NULL,
    PRIMARY KEY (metric, device_id)
) WITH (fillfactor = 70);

-- telemetry_link is the radio link each device last reported. It is a table
-- of its own rather than columns of devices: telemetry arrives far more often
-- than presence changes, and its updates must not contend with the presence
-- writer for the devices rows. A field the device did not report keeps its
-- previous value; at is the latest report (not indexed, as in
-- telemetry_latest).
CREATE TABLE telemetry_link (
    device_id text        PRIMARY KEY,
    bssid     text,
    ssid      text,
    band      text,
    channel   integer,
    at        timestamptz NOT NULL
) WITH (fillfactor = 70);
