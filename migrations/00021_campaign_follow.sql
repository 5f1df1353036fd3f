-- +goose Up

-- Campaigns that follow the fleet pick up devices that start matching their
-- selector after the start. To find them without scanning the fleet on every
-- look, each device carries selection_changed_at: when anything a campaign
-- selects on (firmware, model, tags, state, the incompatible verdict) last
-- changed. A trigger keeps it, because those columns have several writers
-- (registration, the presence writer's connects and births, PATCH, the
-- analysis) and a forgotten one would be a device never picked up. It is
-- set from clock_timestamp() rather than now(), so that it is close to the
-- commit of a long transaction; followers look back a margin for the rest.
-- Existing rows get -infinity (a constant default: no table rewrite); no
-- campaign follows from before this migration, so no follower looks there.
ALTER TABLE devices ADD COLUMN selection_changed_at timestamptz NOT NULL DEFAULT '-infinity';
CREATE INDEX devices_selection_changed_idx ON devices (selection_changed_at, id);

-- +goose StatementBegin
CREATE FUNCTION devices_selection_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.selection_changed_at := clock_timestamp();
    RETURN NEW;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER devices_selection_insert BEFORE INSERT ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_selection_changed();
CREATE TRIGGER devices_selection_update BEFORE UPDATE OF firmware, model, tags, state, incompatible ON devices
    FOR EACH ROW WHEN (OLD.firmware IS DISTINCT FROM NEW.firmware OR OLD.model IS DISTINCT FROM NEW.model
        OR OLD.tags IS DISTINCT FROM NEW.tags OR OLD.state IS DISTINCT FROM NEW.state
        OR OLD.incompatible IS DISTINCT FROM NEW.incompatible)
    EXECUTE FUNCTION devices_selection_changed();

-- A following campaign's place in that order: the devices changed after
-- (follow_after, follow_after_id) are still to be looked at; follow_looked_at
-- is when it last looked (on the dispatcher's clock), so that every replica
-- keeps the same interval. following_since is when its planned stages passed
-- and it went on following; joined counts the devices it picked up.
ALTER TABLE campaigns
    ADD COLUMN follow_after     timestamptz,
    ADD COLUMN follow_after_id  text    NOT NULL DEFAULT '',
    ADD COLUMN follow_looked_at timestamptz,
    ADD COLUMN following_since  timestamptz,
    ADD COLUMN joined           integer NOT NULL DEFAULT 0;

-- A device that comes back on an old version after a following campaign
-- upgraded it gets a new forward job: a new attempt row with its own stored
-- id. campaign_devices.attempt is the device's current forward attempt (the
-- one counted in the stage), so readers join exactly one forward job per
-- device. One open (pending or in flight) job per device and campaign, of
-- either kind, is what the unique index proves: no device ever has two jobs
-- of one campaign going at once, whatever replicas do.
ALTER TABLE campaign_devices ADD COLUMN attempt integer NOT NULL DEFAULT 1;
ALTER TABLE ota_jobs ADD COLUMN attempt integer NOT NULL DEFAULT 1;
-- settled_db_at is when a birth settled a forward job, on the database's
-- clock_timestamp() like selection_changed_at: a follower takes a device
-- whose job succeeded for reflashed only when its row changed after that
-- (the presence writer stores the birth's version a moment after the job
-- succeeded on it, and until then the row still shows the old version).
ALTER TABLE ota_jobs ADD COLUMN settled_db_at timestamptz;
ALTER TABLE ota_jobs DROP CONSTRAINT ota_jobs_campaign_id_device_id_kind_key;
ALTER TABLE ota_jobs ADD CONSTRAINT ota_jobs_attempt_key UNIQUE (campaign_id, device_id, kind, attempt);
CREATE UNIQUE INDEX ota_jobs_open_idx ON ota_jobs (campaign_id, device_id)
    WHERE state IN ('pending', 'dispatched', 'downloading', 'verifying', 'installing', 'rebooting');
