-- +goose Up

-- command_bulks holds one row per bulk command (POST /api/v1/commands): the
-- same command to every device a selector matched when it was created, sent
-- at a pace (max_concurrent commands in flight, devices_per_minute). Each
-- device's command is an ordinary row of commands with bulk_id set, so the
-- single-device API, redelivery, timeouts and expiry apply to it.
--
-- The summary is counters on this row, not a count over commands: commands
-- are pruned by their own retention (and past the newest N per device), and
-- a summary must stay true after that and cost the same after a year. The
-- pacer moves pending to queued (or skipped) as it sends; the triggers below
-- move queued/delivered to the outcomes as commands change, one UPDATE per
-- bulk per statement (transition tables), so a sweep that expires 1 000
-- commands updates each bulk once. Pruning a (finished) command changes no
-- counter.
-- pending + queued + delivered + succeeded + failed + timed_out + expired +
-- skipped + cancelled = total, always.
CREATE TABLE command_bulks (
    id                 text        PRIMARY KEY,
    name               text        NOT NULL,
    params             json        NOT NULL DEFAULT '{}',
    timeout_ms         bigint      NOT NULL,
    expires_in_ms      bigint      NOT NULL,
    selector           jsonb       NOT NULL,
    max_concurrent     int         NOT NULL CHECK (max_concurrent > 0),
    devices_per_minute int         NOT NULL CHECK (devices_per_minute >= 0), -- 0 = no rate limit
    state              text        NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'completed', 'cancelled')),
    total              int         NOT NULL,
    next_position      int         NOT NULL DEFAULT 0, -- targets below it have been sent (or skipped)
    paced_until        timestamptz,                    -- when the next command is due at devices_per_minute
    pending            int         NOT NULL,           -- not sent yet
    queued             int         NOT NULL DEFAULT 0,
    delivered          int         NOT NULL DEFAULT 0,
    succeeded          int         NOT NULL DEFAULT 0,
    failed             int         NOT NULL DEFAULT 0,
    timed_out          int         NOT NULL DEFAULT 0,
    expired            int         NOT NULL DEFAULT 0,
    skipped            int         NOT NULL DEFAULT 0, -- not sent: decommissioned, or too many pending commands
    cancelled          int         NOT NULL DEFAULT 0, -- not sent: the bulk was cancelled first
    created_at         timestamptz NOT NULL,
    finished_at        timestamptz,
    updated_at         timestamptz NOT NULL
);

-- The pacer's work list, and the cap on running bulks.
CREATE INDEX command_bulks_running_idx ON command_bulks (id) WHERE state = 'running';
-- The listing, newest first, and retention.
CREATE INDEX command_bulks_created_idx ON command_bulks (created_at DESC, id DESC);
CREATE INDEX command_bulks_finished_idx ON command_bulks (finished_at) WHERE finished_at IS NOT NULL;

-- command_bulk_targets are the devices a bulk selected, in device id order
-- (so that pacers lock device rows in one order); command_id is set when the
-- device's command is created, skipped says why it never was.
CREATE TABLE command_bulk_targets (
    bulk_id    text NOT NULL REFERENCES command_bulks (id) ON DELETE CASCADE,
    position   int  NOT NULL,
    device_id  text NOT NULL,
    command_id text,
    skipped    text,
    PRIMARY KEY (bulk_id, position)
);

-- No foreign key: a bulk's commands and the bulk are pruned each by its own
-- retention, and the counters never read the commands again.
ALTER TABLE commands ADD COLUMN bulk_id text;
CREATE INDEX commands_bulk_idx ON commands (bulk_id) WHERE bulk_id IS NOT NULL;

-- +goose StatementBegin
CREATE FUNCTION command_bulks_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE bulk_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    -- Lock the bulks in id order first: two statements settling commands
    -- of the same bulks then cannot deadlock on them.
    PERFORM 1 FROM command_bulks WHERE id IN (SELECT bulk_id FROM new_rows WHERE bulk_id IS NOT NULL)
        ORDER BY id FOR NO KEY UPDATE;
    WITH delta AS (
        SELECT bulk_id, state, sum(n) AS n FROM (
            SELECT bulk_id, state, 1 AS n FROM new_rows WHERE bulk_id IS NOT NULL
            UNION ALL
            SELECT bulk_id, state, -1 FROM old_rows WHERE bulk_id IS NOT NULL
        ) x GROUP BY bulk_id, state
    ), per_bulk AS (
        SELECT bulk_id,
            coalesce(sum(n) FILTER (WHERE state = 'queued'), 0) AS queued,
            coalesce(sum(n) FILTER (WHERE state = 'delivered'), 0) AS delivered,
            coalesce(sum(n) FILTER (WHERE state = 'succeeded'), 0) AS succeeded,
            coalesce(sum(n) FILTER (WHERE state = 'failed'), 0) AS failed,
            coalesce(sum(n) FILTER (WHERE state = 'timed_out'), 0) AS timed_out,
            coalesce(sum(n) FILTER (WHERE state = 'expired'), 0) AS expired
        FROM delta GROUP BY bulk_id HAVING bool_or(n <> 0)
    )
    UPDATE command_bulks b SET queued = b.queued + d.queued, delivered = b.delivered + d.delivered,
        succeeded = b.succeeded + d.succeeded, failed = b.failed + d.failed,
        timed_out = b.timed_out + d.timed_out, expired = b.expired + d.expired
    FROM per_bulk d WHERE b.id = d.bulk_id;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- An insert has no old rows (a trigger may not name a transition table its
-- event lacks): inserts have their own function.
-- +goose StatementBegin
CREATE FUNCTION command_bulks_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE bulk_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM command_bulks WHERE id IN (SELECT bulk_id FROM new_rows WHERE bulk_id IS NOT NULL)
        ORDER BY id FOR NO KEY UPDATE;
    UPDATE command_bulks b SET queued = b.queued + d.n
    FROM (SELECT bulk_id, count(*) AS n FROM new_rows WHERE bulk_id IS NOT NULL AND state = 'queued' GROUP BY bulk_id) d
    WHERE b.id = d.bulk_id;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- Pruning deletes finished commands only, and changes no counter. A pending
-- command deleted with its device's row (by hand: fleetd never deletes a
-- device) would stay counted in flight and hold its bulk running forever:
-- it counts as expired instead.
-- +goose StatementBegin
CREATE FUNCTION command_bulks_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE bulk_id IS NOT NULL AND state IN ('queued', 'delivered')) THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM command_bulks WHERE id IN (SELECT bulk_id FROM old_rows WHERE bulk_id IS NOT NULL AND state IN ('queued', 'delivered'))
        ORDER BY id FOR NO KEY UPDATE;
    UPDATE command_bulks b SET queued = b.queued - d.queued, delivered = b.delivered - d.delivered,
        expired = b.expired + d.queued + d.delivered
    FROM (SELECT bulk_id, count(*) FILTER (WHERE state = 'queued') AS queued, count(*) FILTER (WHERE state = 'delivered') AS delivered
        FROM old_rows WHERE bulk_id IS NOT NULL AND state IN ('queued', 'delivered') GROUP BY bulk_id) d
    WHERE b.id = d.bulk_id;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER commands_bulk_count_update AFTER UPDATE ON commands
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION command_bulks_count();
CREATE TRIGGER commands_bulk_count_insert AFTER INSERT ON commands
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION command_bulks_count_insert();
CREATE TRIGGER commands_bulk_count_delete AFTER DELETE ON commands
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION command_bulks_count_delete();
