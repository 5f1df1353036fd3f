-- +goose Up

-- device_events becomes a table partitioned by day (range of at, UTC
-- midnight to midnight), so that events past the retention go with a DROP
-- TABLE of their day instead of a DELETE, and a query bounded in time reads
-- only the days it needs (fleet/partitions.go keeps the partitions: it
-- creates them ahead and drops them after -event-retention). A partition is
-- named device_events_pYYYYMMDD after its day.
--
-- The primary key must hold the partition key, so it is (id, at). A replayed
-- event has the same id and the same at, so replays stay idempotent (ON
-- CONFLICT (id, at) DO NOTHING).
--
-- There is no DEFAULT partition: a write for a day that has no partition yet
-- creates that day's partition and is retried (Store.writeEvents). A default
-- partition would have to be emptied into proper partitions under locks, and
-- every partition created ahead would first have to scan it.
ALTER TABLE device_events RENAME TO device_events_unpartitioned;
ALTER INDEX device_events_pkey RENAME TO device_events_unpartitioned_pkey;
ALTER INDEX device_events_device_at_idx RENAME TO device_events_unpartitioned_device_at_idx;
ALTER INDEX device_events_at_idx RENAME TO device_events_unpartitioned_at_idx;
ALTER INDEX device_events_session_idx RENAME TO device_events_unpartitioned_session_idx;

-- The same columns in the same order (the writer copies rows with SELECT *),
-- defaults and constraints (device_events_kind_check keeps its name).
CREATE TABLE device_events (LIKE device_events_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (at);

-- A partition for every day that has events, and for yesterday, today and
-- the next seven days; from then on the maintenance loop creates them ahead.
-- +goose StatementBegin
DO $$
DECLARE
    d date;
BEGIN
    FOR d IN
        SELECT DISTINCT (at AT TIME ZONE 'UTC')::date FROM device_events_unpartitioned
        UNION
        SELECT (now() AT TIME ZONE 'UTC')::date + i FROM generate_series(-1, 7) AS i
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF device_events FOR VALUES FROM (%L) TO (%L)',
            'device_events_p' || to_char(d, 'YYYYMMDD'),
            to_char(d, 'YYYY-MM-DD') || ' 00:00:00+00', to_char(d + 1, 'YYYY-MM-DD') || ' 00:00:00+00');
    END LOOP;
END
$$;
-- +goose StatementEnd

INSERT INTO device_events SELECT * FROM device_events_unpartitioned;
DROP TABLE device_events_unpartitioned;

-- Keys and indexes after the copy (faster than maintaining them row by row);
-- each partition gets its own, and so does every partition created later.
ALTER TABLE device_events ADD PRIMARY KEY (id, at);
CREATE INDEX device_events_device_at_idx ON device_events (device_id, at DESC, id DESC);
CREATE INDEX device_events_at_idx ON device_events (at);
CREATE INDEX device_events_session_idx ON device_events (device_id, session_epoch) WHERE kind IN ('connect', 'disconnect');

-- Rollups are maintained by the writer in the transaction that inserts the
-- events, from the rows that insert returned, so that a replayed event (not
-- inserted again) is not counted again. Fleet health, fleet history and the
-- learned verdicts read them, so their cost does not grow with the events
-- kept. They have their own retention, longer than the events'
-- (-rollup-retention, -hourly-rollup-retention), pruned by the maintenance
-- loop. Minutes and hours are UTC.

-- event_rollups_minute counts events per minute by firmware, model,
-- protocol, replica, kind and reason (connects, disconnects by reason,
-- refusals by reason, ...).
CREATE TABLE event_rollups_minute (
    minute           timestamptz NOT NULL,
    firmware         text        NOT NULL,
    model            text        NOT NULL,
    protocol_version smallint    NOT NULL,
    broker_node      text        NOT NULL,
    kind             text        NOT NULL,
    reason           text        NOT NULL,
    count            bigint      NOT NULL,
    PRIMARY KEY (minute, firmware, model, protocol_version, broker_node, kind, reason)
);

-- event_rollups_hour holds the same counts per hour, for the ranges where
-- minutes would be too many rows (fleet history by hour or day, the last day
-- of fleet health).
CREATE TABLE event_rollups_hour (
    hour             timestamptz NOT NULL,
    firmware         text        NOT NULL,
    model            text        NOT NULL,
    protocol_version smallint    NOT NULL,
    broker_node      text        NOT NULL,
    kind             text        NOT NULL,
    reason           text        NOT NULL,
    count            bigint      NOT NULL,
    PRIMARY KEY (hour, firmware, model, protocol_version, broker_node, kind, reason)
);

-- What the learned verdicts need (fleet.FirmwareStats), kept exactly rather
-- than approximated, in three parts. A session belongs to the firmware and
-- model its disconnect recorded (set by the birth), else its connect's.
--
-- sessions_open holds the sessions whose connect is stored and whose
-- disconnect is not: a disconnect takes its session's start, firmware and
-- model from here. Live sessions count in the verdicts from here too.
CREATE TABLE sessions_open (
    device_id     text        NOT NULL,
    session_epoch bigint      NOT NULL,
    started_at    timestamptz NOT NULL,
    model         text        NOT NULL,
    firmware      text        NOT NULL,
    PRIMARY KEY (device_id, session_epoch)
);

-- session_rollups_minute counts the ended sessions per minute of their end
-- (ended, ping_disconnects, end_offset_us: the sum of how far into the
-- minute they ended) and, in the row of the minute they started, the same
-- sessions' starts (started, start_offset_us), both written when the session
-- ends. The connected time of the sessions that ended at or after a minute A
-- is then sum(end - A) over the end rows from A on minus sum(start - A) over
-- the start rows from A on: a session that started before A is counted from A.
CREATE TABLE session_rollups_minute (
    minute           timestamptz NOT NULL,
    model            text        NOT NULL,
    firmware         text        NOT NULL,
    ended            bigint      NOT NULL DEFAULT 0,
    ping_disconnects bigint      NOT NULL DEFAULT 0,
    end_offset_us    bigint      NOT NULL DEFAULT 0,
    started          bigint      NOT NULL DEFAULT 0,
    start_offset_us  bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, model, firmware)
);

-- session_devices holds when each device last ended a session on each
-- (model, firmware): with sessions_open, the distinct devices of a window.
CREATE TABLE session_devices (
    model     text        NOT NULL,
    firmware  text        NOT NULL,
    device_id text        NOT NULL,
    last_end  timestamptz NOT NULL,
    PRIMARY KEY (model, firmware, device_id)
);

-- The rollups of the events moved above. Sessions pair a connect with the
-- first disconnect of the same (device, epoch), as the writer pairs them.
INSERT INTO event_rollups_minute
SELECT date_trunc('minute', at, 'UTC'), firmware, model, protocol_version, broker_node, kind, reason, count(*)
FROM device_events GROUP BY 1, 2, 3, 4, 5, 6, 7;
INSERT INTO event_rollups_hour
SELECT date_trunc('hour', at, 'UTC'), firmware, model, protocol_version, broker_node, kind, reason, count(*)
FROM device_events GROUP BY 1, 2, 3, 4, 5, 6, 7;

CREATE TEMP TABLE backfill_connects ON COMMIT DROP AS
SELECT DISTINCT ON (device_id, session_epoch) device_id, session_epoch, at, model, firmware
FROM device_events WHERE kind = 'connect' ORDER BY device_id, session_epoch, at, id;
CREATE TEMP TABLE backfill_ended ON COMMIT DROP AS
SELECT c.device_id, c.at AS started_at, d.at AS ended_at,
       coalesce(nullif(d.model, ''), c.model) AS model, coalesce(nullif(d.firmware, ''), c.firmware) AS firmware,
       (d.reason = 'protocol_error' AND d.detail LIKE 'PINGREQ%') OR (d.reason = 'keepalive_timeout' AND d.pings = 0) AS ping
FROM backfill_connects c
JOIN (SELECT DISTINCT ON (device_id, session_epoch) device_id, session_epoch, at, model, firmware, reason, detail, pings
      FROM device_events WHERE kind = 'disconnect' ORDER BY device_id, session_epoch, at, id) d
  USING (device_id, session_epoch);

INSERT INTO sessions_open (device_id, session_epoch, started_at, model, firmware)
SELECT c.device_id, c.session_epoch, c.at, c.model, c.firmware FROM backfill_connects c
WHERE NOT EXISTS (SELECT 1 FROM device_events d
                  WHERE d.kind = 'disconnect' AND d.device_id = c.device_id AND d.session_epoch = c.session_epoch);

INSERT INTO session_rollups_minute (minute, model, firmware, ended, ping_disconnects, end_offset_us, started, start_offset_us)
SELECT minute, model, firmware, sum(ended), sum(ping), sum(end_offset_us), sum(started), sum(start_offset_us)
FROM (
    SELECT date_trunc('minute', ended_at, 'UTC') AS minute, model, firmware, 1 AS ended, ping::int AS ping,
           (extract(epoch FROM ended_at - date_trunc('minute', ended_at, 'UTC')) * 1000000)::bigint AS end_offset_us,
           0 AS started, 0::bigint AS start_offset_us
    FROM backfill_ended
    UNION ALL
    SELECT date_trunc('minute', started_at, 'UTC'), model, firmware, 0, 0, 0, 1,
           (extract(epoch FROM started_at - date_trunc('minute', started_at, 'UTC')) * 1000000)::bigint
    FROM backfill_ended
) s
GROUP BY minute, model, firmware;

INSERT INTO session_devices (model, firmware, device_id, last_end)
SELECT model, firmware, device_id, max(ended_at) FROM backfill_ended GROUP BY model, firmware, device_id;

ANALYZE device_events, event_rollups_minute, event_rollups_hour, sessions_open, session_rollups_minute, session_devices;
