-- +goose Up

-- Operators: user accounts with a role, their console sessions, API keys,
-- and the audit log of every state-changing API request.
--
-- Everything an authentication decision reads lives here, read on each
-- request by primary key, so a change made on one replica (a revoked key, a
-- signed-out session, a disabled user) holds on every replica at once.

-- users sign in to the console. password_hash is an argon2id PHC string
-- ($argon2id$v=19$m=…,t=…,p=…$salt$hash), so the parameters travel with it.
CREATE TABLE users (
    id            text        PRIMARY KEY,
    name          text        NOT NULL,
    role          text        NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash text        NOT NULL,
    disabled      boolean     NOT NULL DEFAULT false,
    created_by    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- Names are unique whatever their case: "Alice" and "alice" are one person.
CREATE UNIQUE INDEX users_name ON users (lower(name));

-- sessions are console sign-ins. Only the SHA-256 of the cookie's value is
-- kept: a copy of the table does not sign anyone in. A session ends at
-- expires_at (absolute) or when idle longer than the idle timeout
-- (last_seen_at, refreshed at most once a minute); deleting the user ends
-- them all.
CREATE TABLE sessions (
    token_hash   bytea       PRIMARY KEY,
    user_id      text        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_token   text        NOT NULL,
    remote       text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_expires ON sessions (expires_at);

-- api_keys are for scripts and fleetctl: "fk_" + id + secret, shown once;
-- only the SHA-256 of the secret is kept (it is 32 random bytes, so a slow
-- hash adds nothing). A key made by a user dies with that user
-- (created_by_user, ON DELETE CASCADE) and is refused while the user is
-- disabled; its role is never more than its creator's current role.
CREATE TABLE api_keys (
    id              text        PRIMARY KEY,
    name            text        NOT NULL,
    role            text        NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    secret_hash     bytea       NOT NULL,
    created_by      text        NOT NULL,
    created_by_user text        REFERENCES users (id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    last_used_at    timestamptz
);
CREATE INDEX api_keys_created_by_user ON api_keys (created_by_user);

-- audit_log holds every state-changing API request (sign-in and sign-out,
-- refused ones included): who, what, when, from where, and the outcome.
-- Listed newest first by id; each filter GET /api/v1/audit offers has an
-- index that serves it with the id order.
CREATE TABLE audit_log (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    principal_kind text        NOT NULL,
    principal_id   text        NOT NULL,
    principal_name text        NOT NULL,
    principal_role text        NOT NULL DEFAULT '',
    method         text        NOT NULL,
    route          text        NOT NULL,
    path           text        NOT NULL,
    -- The route's path parameters ({"id":"d1"}) and their values alone, for
    -- the target filter.
    targets        jsonb       NOT NULL DEFAULT '{}',
    target_ids     text[]      NOT NULL DEFAULT '{}',
    summary        jsonb,
    remote         text        NOT NULL,
    request_id     text        NOT NULL,
    status         int         NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_principal_id ON audit_log (principal_id, id);
CREATE INDEX audit_log_principal_name ON audit_log (principal_name, id);
CREATE INDEX audit_log_route ON audit_log (route, method, id);
CREATE INDEX audit_log_status ON audit_log (status, id);
CREATE INDEX audit_log_request ON audit_log (request_id);
CREATE INDEX audit_log_targets ON audit_log USING gin (target_ids);
