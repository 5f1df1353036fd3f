-- +goose Up

-- event_dead_letters keeps the connection events PostgreSQL refused for their
-- content (a device id too long to index, a NUL byte in a string, ...), so
-- that one bad event never blocks the others and an operator can still see
-- what a device sent. The event is stored as the bytes of its JSON, cut at
-- 8 KiB (event_bytes is the whole length), and error as cleaned, bounded text:
-- nothing a device sends can make this insert fail too.
CREATE TABLE event_dead_letters (
    event_id    uuid        PRIMARY KEY,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    event       bytea       NOT NULL,
    event_bytes integer     NOT NULL,
    error       text        NOT NULL
);

CREATE INDEX event_dead_letters_failed_at_idx ON event_dead_letters (failed_at);
