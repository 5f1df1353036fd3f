-- +goose Up

-- paced_until is a campaign's pacing schedule: when its next job is due if
-- jobs go out at exactly devices_per_minute (see firmware.Campaign.PacedUntil).
-- Start, resume and rollback set it to the current time; NULL before a campaign starts.
ALTER TABLE campaigns ADD COLUMN paced_until timestamptz;

