-- +goose Up

-- What the broker saw of a session, recorded with its disconnect: how many
-- packets and bytes the device sent, how long the session lasted, and the
-- longest silence between two packets of the device before its end. With
-- pings and idle_ms they tell the causes apart: a firmware that never kept a
-- session alive past its first keepalive period (no_pings), one that pinged
-- and then froze (stalls), a path that cuts idle connections (the same idle
-- time while the device was silent, and never a longer silence survived).
ALTER TABLE device_events
    ADD COLUMN packets_in     integer NOT NULL DEFAULT 0,
    ADD COLUMN bytes_in       bigint  NOT NULL DEFAULT 0,
    ADD COLUMN duration_ms    bigint  NOT NULL DEFAULT 0,
    ADD COLUMN max_silence_ms integer NOT NULL DEFAULT 0;
