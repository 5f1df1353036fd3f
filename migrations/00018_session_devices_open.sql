-- +goose Up

-- session_devices also counts each device's open sessions per (model,
-- firmware), kept by the event writer with the rest of the rollups: a
-- connect that opens a session adds one on its model and firmware, the
-- disconnect that closes it takes one off the same row (and moves last_end
-- on the row of the model and firmware it ended on). The verdicts' distinct
-- devices of a window are then the rows that ended a session in it or have
-- one open, one scan of this table, instead of a union of it with
-- sessions_open deduplicated on every analysis run (0.4 s with 200 000
-- devices, most of a run). A row of a device that has only ever had open
-- sessions on a firmware has last_end -infinity.
ALTER TABLE session_devices ADD COLUMN open_sessions integer NOT NULL DEFAULT 0;

INSERT INTO session_devices AS s (model, firmware, device_id, last_end, open_sessions)
SELECT model, firmware, device_id, '-infinity', count(*) FROM sessions_open GROUP BY model, firmware, device_id
ON CONFLICT (model, firmware, device_id) DO UPDATE SET open_sessions = EXCLUDED.open_sessions;

ANALYZE session_devices;
