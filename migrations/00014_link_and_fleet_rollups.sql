-- +goose Up

-- The radio link a session ended on, recorded with its disconnect from the
-- device's telemetry of that session (telemetry.Stamper): the RSSI and
-- channel it last reported, the access point (BSSID) it last and first
-- reported, and how long before the end it last changed access point. NULL
-- when the session reported no link. With them the WiFi diagnosis tells a
-- weak signal, a congested channel, a bad access point and drops on roaming
-- from each other and from the firmware's causes (fleet/diagnose_link.go).
-- Nullable and without a default, so adding them rewrites no partition.
ALTER TABLE device_events
    ADD COLUMN link_rssi        smallint,
    ADD COLUMN link_channel     smallint,
    ADD COLUMN link_bssid       text,
    ADD COLUMN link_first_bssid text,
    ADD COLUMN link_roam_ms     bigint;

-- link_rollups_hour counts, per hour of their end, the sessions that ended
-- with a link report, by model, channel, access point and RSSI (5 dB buckets:
-- -75 holds -75 to -71): how many ended, how many were lost on the link
-- (connection_lost, keepalive_timeout), how many of those on a roam, and
-- their connected time. Maintained by the event writer with the other
-- rollups, from the events its insert kept; the fleet's link view and the
-- channel and access point rules read it, so their cost follows the
-- window's hours and links, not the events kept. Pruned with the minute
-- rollups (-rollup-retention).
CREATE TABLE link_rollups_hour (
    hour         timestamptz NOT NULL,
    model        text        NOT NULL,
    channel      smallint    NOT NULL, -- 0: not reported
    bssid        text        NOT NULL, -- '': not reported
    rssi_bucket  smallint    NOT NULL, -- 0: not reported
    ended        bigint      NOT NULL,
    lost         bigint      NOT NULL,
    roam_lost    bigint      NOT NULL,
    connected_us bigint      NOT NULL,
    PRIMARY KEY (hour, model, channel, bssid, rssi_bucket)
);

-- fleet_counts_minute and fleet_counts_hour are the event rollups without
-- model and replica: the counts fleet health's disconnects and the campaign
-- connectivity gate read. event_rollups_* keep about eight times
-- more rows per bucket (4 models x 2 replicas); these few rows per bucket keep
-- a day by minute or a month by day in the tens of milliseconds. Maintained
-- by the event writer with the others, pruned with them.
CREATE TABLE fleet_counts_minute (
    minute           timestamptz NOT NULL,
    firmware         text        NOT NULL,
    protocol_version smallint    NOT NULL,
    kind             text        NOT NULL,
    reason           text        NOT NULL,
    count            bigint      NOT NULL,
    PRIMARY KEY (minute, kind, reason, firmware, protocol_version)
);
CREATE TABLE fleet_counts_hour (
    hour             timestamptz NOT NULL,
    firmware         text        NOT NULL,
    protocol_version smallint    NOT NULL,
    kind             text        NOT NULL,
    reason           text        NOT NULL,
    count            bigint      NOT NULL,
    PRIMARY KEY (hour, kind, reason, firmware, protocol_version)
);
-- history_minute and history_hour hold the same counts by kind and reason
-- only: fleet history's buckets, a dozen rows each.
CREATE TABLE history_minute (
    minute timestamptz NOT NULL,
    kind   text        NOT NULL,
    reason text        NOT NULL,
    count  bigint      NOT NULL,
    PRIMARY KEY (minute, kind, reason)
);
CREATE TABLE history_hour (
    hour   timestamptz NOT NULL,
    kind   text        NOT NULL,
    reason text        NOT NULL,
    count  bigint      NOT NULL,
    PRIMARY KEY (hour, kind, reason)
);
INSERT INTO history_minute SELECT minute, kind, reason, sum(count) FROM event_rollups_minute GROUP BY 1, 2, 3;
INSERT INTO history_hour SELECT hour, kind, reason, sum(count) FROM event_rollups_hour GROUP BY 1, 2, 3;
INSERT INTO fleet_counts_minute
SELECT minute, firmware, protocol_version, kind, reason, sum(count) FROM event_rollups_minute GROUP BY 1, 2, 3, 4, 5;
INSERT INTO fleet_counts_hour
SELECT hour, firmware, protocol_version, kind, reason, sum(count) FROM event_rollups_hour GROUP BY 1, 2, 3, 4, 5;
ANALYZE fleet_counts_minute, fleet_counts_hour, history_minute, history_hour;
