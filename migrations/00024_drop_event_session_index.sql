-- +goose Up

-- device_events_session_idx found a session's connect and disconnect by
-- (device_id, session_epoch) for the diagnosis until the session rollups
-- (00012: sessions_open, session_rollups_minute) replaced that pairing, and
-- served 00012's backfill. No query reads it since, while every connect and
-- disconnect paid an insertion into it (a quarter of the event table's index
-- writes) and a year of history its disk. Dropping the partitioned index
-- drops it from every partition.
DROP INDEX IF EXISTS device_events_session_idx;
