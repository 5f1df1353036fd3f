-- +goose Up

-- firmware_deltas holds one row per (base image, target image) pair a delta
-- campaign asked for: the binary delta that turns the base's bytes into the
-- target's. The delta's bytes are in firmware_chunks under the delta's own
-- SHA-256 (content-addressed like an image), written in the transaction that
-- sets the row ready. A replica builds a pending row while holding its row
-- lock (FOR UPDATE SKIP LOCKED) in the transaction that stores the result,
-- so one build runs per pair across replicas and a build cut by a crash
-- rolls back to pending and is done again.
CREATE TABLE firmware_deltas (
    base_sha256   text        NOT NULL,
    target_sha256 text        NOT NULL,
    state         text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'ready', 'failed')),
    sha256        text,
    size          bigint,
    encoding      text        NOT NULL DEFAULT '',
    window_size   bigint,
    error         text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    build_ms      integer,
    PRIMARY KEY (base_sha256, target_sha256),
    CHECK (state <> 'ready' OR (sha256 IS NOT NULL AND size IS NOT NULL))
);
CREATE INDEX firmware_deltas_pending_idx ON firmware_deltas (created_at) WHERE state = 'pending';
CREATE INDEX firmware_deltas_sha256_idx ON firmware_deltas (sha256) WHERE sha256 IS NOT NULL;

-- A forward job of a delta campaign records the base image whose delta its
-- manifest names (NULL: the full image only), so that a job sent again is
-- the same job. bytes_sent counts the bytes fleetd served for the job's
-- signed download URLs (image and delta, resumes included), added by the
-- replica that served them.
ALTER TABLE ota_jobs ADD COLUMN delta_base text, ADD COLUMN bytes_sent bigint NOT NULL DEFAULT 0,
    ADD COLUMN full_bytes_sent bigint NOT NULL DEFAULT 0;
