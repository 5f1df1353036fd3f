-- +goose Up

-- firmware_chunks holds the bytes of every firmware image, so that any
-- replica serves any image: one row per MiB of a SHA-256 (seq from 0), shared
-- by every artifact with those bytes. A digest's rows are written by the
-- transaction that records its first artifact and deleted by the one that
-- deletes its last, both under the digest's advisory lock, so they exist
-- exactly while an artifact has the digest (firmware/chunks.go). The
-- content-addressed files under each replica's data dir are now its cache.
-- Artifacts recorded before this table have no rows yet: the replica that
-- holds their file imports it at start-up.
CREATE TABLE firmware_chunks (
    sha256 text    NOT NULL,
    seq    integer NOT NULL CHECK (seq >= 0),
    data   bytea   NOT NULL,
    PRIMARY KEY (sha256, seq)
);

-- Images are mostly compressed already: store them out of line without
-- trying to compress them again.
ALTER TABLE firmware_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
