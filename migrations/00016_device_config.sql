-- +goose Up

-- config_layers holds the operator's configuration layers: the fleet
-- defaults (scope 'fleet'), one per model ('model:gw-100'), one per tag
-- ('tag:site=lyon') and one per model at a tag ('model:gw-100,tag:site=lyon').
-- A device's effective desired document merges the layers that apply to it,
-- in that order, and then its own layer (device_config.layer). config is
-- jsonb: documents are compared and re-encoded by fleetd, never returned
-- byte for byte.
CREATE TABLE config_layers (
    scope      text        PRIMARY KEY,
    kind       text        NOT NULL CHECK (kind IN ('fleet', 'model', 'tag', 'model_tag')),
    model      text        NOT NULL DEFAULT '',
    tag        text        NOT NULL DEFAULT '',
    config     jsonb       NOT NULL,
    revision   bigint      NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

-- device_config holds one row per device: its own layer, its effective
-- desired document with the device's version of it, and the latest report.
-- version only grows, by one whenever the effective document changes, so a
-- report of an older version is detectably stale; it is never reset (a
-- re-registered device keeps counting up). stale marks rows whose layers,
-- model or tags changed since they were resolved: a layer change marks its
-- devices in one statement, and fleetd re-resolves marked rows in batches.
CREATE TABLE device_config (
    device_id        text        PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    layer            jsonb       NOT NULL DEFAULT '{}',
    layer_revision   bigint      NOT NULL DEFAULT 0,
    effective        jsonb       NOT NULL DEFAULT '{}',
    version          bigint      NOT NULL DEFAULT 0,
    sources          jsonb       NOT NULL DEFAULT '[]', -- the scopes that made the effective document, in order
    stale            boolean     NOT NULL DEFAULT true,
    problem          text        NOT NULL DEFAULT '',   -- why the effective document could not be updated
    changed_at       timestamptz,                       -- when version last grew
    reported         jsonb,
    reported_version bigint,
    reported_at      timestamptz
);

CREATE INDEX device_config_stale_idx ON device_config (device_id) WHERE stale;

INSERT INTO device_config (device_id) SELECT id FROM devices;

-- Every device has a row from its registration on; a change of its model or
-- tags marks it for re-resolution; a decommissioned device registered again
-- starts with no layer and no report of its own (its version goes on).
-- +goose StatementBegin
CREATE FUNCTION device_config_follow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO device_config (device_id) VALUES (NEW.id) ON CONFLICT (device_id) DO NOTHING;
    ELSIF OLD.state = 'decommissioned' AND NEW.state = 'active' THEN
        UPDATE device_config SET layer = '{}', layer_revision = layer_revision + 1, stale = true,
            reported = NULL, reported_version = NULL, reported_at = NULL
        WHERE device_id = NEW.id;
    ELSE
        UPDATE device_config SET stale = true WHERE device_id = NEW.id;
    END IF;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER device_config_insert AFTER INSERT ON devices
    FOR EACH ROW EXECUTE FUNCTION device_config_follow();
CREATE TRIGGER device_config_update AFTER UPDATE OF model, tags, state ON devices
    FOR EACH ROW WHEN (OLD.model IS DISTINCT FROM NEW.model OR OLD.tags IS DISTINCT FROM NEW.tags
        OR (OLD.state = 'decommissioned' AND NEW.state = 'active'))
    EXECUTE FUNCTION device_config_follow();
