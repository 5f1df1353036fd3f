-- +goose Up

-- telemetry_raw holds every telemetry message fleetd stored, one row per
-- message: its metrics as two parallel arrays (names[i] is the name of
-- vals[i]; telemetry.Parse bounds them: at most 32, names
-- ^[a-z][a-z0-9_]{0,31}$, finite values) and the link fields it reported
-- (NULL: not reported). One row per message, rather than one per metric with
-- the rollups updated in the same transaction, is what lets ingest keep up
-- with the fleet's busiest stream: a message costs one heap row and one index
-- entry (see telemetry.Writer); the rollups below are computed from these rows
-- once a minute has closed (telemetry.RollupJob).
--
-- Rows are kept for a short window (telemetry-raw-retention, default 48 h).
-- The table is partitioned by day of `at` (UTC): fleetd creates the
-- partitions ahead and drops a whole day once it is older than the retention
-- and rolled up, never a mass DELETE. `at` is when fleetd received the
-- message, strictly increasing per device, so the key is unique and a batch
-- written twice (a retry after a lost commit) inserts nothing the second
-- time. device_id has no foreign key: a decommissioned device's history stays
-- until retention removes it; it is compared bytewise ("C"), which is all a
-- device id needs and keeps the key's index cheap to insert into.
--
-- late marks a row written for a minute that was already sealed for the
-- rollup (a batch delayed by an outage): the writer added it to the rollups
-- itself, in the same transaction, so the rollup job leaves it out. The BRIN
-- index on at is how the rollup job finds a time range: rows are appended in
-- about the order of at, and the index costs almost nothing to maintain.
CREATE TABLE telemetry_raw (
    device_id text COLLATE "C" NOT NULL,
    at        timestamptz      NOT NULL,
    names     text[]           NOT NULL,
    vals      double precision[] NOT NULL,
    bssid     text,
    ssid      text,
    band      text,
    channel   smallint,
    late      boolean          NOT NULL DEFAULT false,
    PRIMARY KEY (device_id, at)
) PARTITION BY RANGE (at);
CREATE INDEX telemetry_raw_at_idx ON telemetry_raw USING brin (at) WITH (autosummarize = on);

-- telemetry_rollup_state is the rollup job's watermarks (one row):
--
--   sealed_to: the minutes before it are closed; a writer that brings a row
--       older than it marks the row late and adds it to the rollups itself.
--       Moved forward under an exclusive advisory lock that every batch
--       write holds shared (advisory.TelemetrySeal), so no batch straddles
--       the move.
--   rolled_to: the rows before it (late or not) are in the rollups; the
--       job adds the rows of [rolled_to, sealed_to) that are not late and
--       moves it, in one transaction, so each minute is rolled up once.
--       Queries read the rollups before it and the raw rows after it.
--   latest_to: the job copies the latest values and links of the rows
--       before it to telemetry_latest and telemetry_link between rollups,
--       so that those stay current to within the job's interval.
--
-- They start at the epoch: the first run starts at the first raw row.
CREATE TABLE telemetry_rollup_state (
    one       boolean     PRIMARY KEY DEFAULT true CHECK (one),
    sealed_to timestamptz NOT NULL,
    rolled_to timestamptz NOT NULL,
    latest_to timestamptz NOT NULL
);
INSERT INTO telemetry_rollup_state (sealed_to, rolled_to, latest_to) VALUES ('epoch', 'epoch', 'epoch');

-- telemetry_minute and telemetry_hour are the rollups, one row per device,
-- metric and bucket. The rollup job adds each closed minute's rows to both;
-- a late row is added by its writer. Rows combine by addition (counts, sums),
-- least and greatest (min, max) and the latest point (last is the value at
-- last_at), so additions in any order give the same row. Retention deletes
-- old rows in bounded batches by bucket, hence its index.
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
);
CREATE INDEX telemetry_minute_bucket_idx ON telemetry_minute (bucket);

-- The same by hour (bucket: the start of the hour, UTC). An hour's row is
-- updated by each of its minutes' rollups: room left in each page
-- (fillfactor) keeps those updates HOT.
CREATE TABLE telemetry_hour (LIKE telemetry_minute INCLUDING ALL) WITH (fillfactor = 70);

-- telemetry_latest is each device's latest value of each metric, which the
-- fleet view aggregates by firmware, model, channel or access point without
-- scanning history. Keyed by metric first: that view reads one metric. The
-- rollup job updates it every run, so `at` has no index (the update stays
-- HOT); retention finds silent devices' rows by a bounded scan of this table,
-- which holds one row per device and metric.
CREATE TABLE telemetry_latest (
    metric    text             NOT NULL,
    device_id text             NOT NULL,
    value     double precision NOT NULL,
    at        timestamptz      NOT NULL,
    PRIMARY KEY (metric, device_id)
) WITH (fillfactor = 70);

-- telemetry_link is the radio link each device last reported, updated from
-- telemetry_raw by the rollup job every run (by default every 10 s). It is a
-- table of its own rather than columns of devices: telemetry arrives far
-- more often than presence changes, and its updates must not contend with
-- the presence writer for the devices rows. A field the device did not report
-- keeps its previous value; at is the latest report (not indexed, as in
-- telemetry_latest).
CREATE TABLE telemetry_link (
    device_id text        PRIMARY KEY,
    bssid     text,
    ssid      text,
    band      text,
    channel   integer,
    at        timestamptz NOT NULL
) WITH (fillfactor = 70);
