-- +goose Up

-- 'rejected' records a device message fleetd refused (a malformed birth, an
-- MQTT 5 user property it cannot keep), with why in detail.
ALTER TABLE device_events DROP CONSTRAINT device_events_kind_check;
ALTER TABLE device_events ADD CONSTRAINT device_events_kind_check
    CHECK (kind IN ('connect', 'disconnect', 'refused', 'acl_denied', 'birth', 'rejected')) NOT VALID;
ALTER TABLE device_events VALIDATE CONSTRAINT device_events_kind_check;
