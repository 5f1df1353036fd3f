-- +goose Up

-- approved is how many stages of a campaign, from the first, an operator has
-- let start (see firmware.Campaign.Approved): a stage that requires approval
-- dispatches only once approved, and the campaign waits in awaiting_approval
-- until then. A campaign's maintenance windows and time zones live in its
-- spec, which already holds its definition.
ALTER TABLE campaigns ADD COLUMN approved integer NOT NULL DEFAULT 0;
