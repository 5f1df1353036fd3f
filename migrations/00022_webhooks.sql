-- +goose Up

-- Notifications that reach people: webhook subscriptions on event types,
-- and a transactional outbox of what happened.
--
-- A notification is written by the statement, or in the transaction, that
-- made the change it tells of (a trigger on campaign_history and on
-- firmware_verdict_history, the analysis' compatibility update, the
-- recorder's state), so it is never lost to a crash between the change and
-- the send, and a change made on any replica is told once. The fan-out to
-- subscriptions happens in the same insert (the trigger below); each
-- replica's deliverer claims due deliveries with FOR UPDATE SKIP LOCKED.

-- webhook_subscriptions are managed by admins (POST /api/v1/webhooks). The
-- secret signs every delivery (HMAC-SHA256); it is shown once, at creation,
-- and must be kept here in the clear to sign with.
CREATE TABLE webhook_subscriptions (
    id                   text        PRIMARY KEY,
    url                  text        NOT NULL,
    description          text        NOT NULL DEFAULT '',
    events               text[]      NOT NULL CHECK (cardinality(events) > 0),
    secret               text        NOT NULL,
    enabled              boolean     NOT NULL DEFAULT true,
    -- Failed deliveries in a row; at the limit the subscription is disabled
    -- and disabled_reason says why. A delivered notification resets it.
    consecutive_failures int         NOT NULL DEFAULT 0,
    disabled_reason      text        NOT NULL DEFAULT '',
    disabled_at          timestamptz,
    created_by           text        NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- notifications is the outbox: one row per thing that happened, whoever
-- subscribes to it. Pruned by the deliverer after the notification
-- retention, with its deliveries.
CREATE TABLE notifications (
    id      bigserial   PRIMARY KEY,
    type    text        NOT NULL,
    payload jsonb       NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_at_idx ON notifications (at);

-- webhook_deliveries: one per (notification, subscription). pending until
-- delivered (a 2xx) or failed (out of attempts, or the subscription was
-- disabled). A claim moves next_attempt_at past the request's timeout, so a
-- replica that dies mid-request leaves the delivery to be tried again.
CREATE TABLE webhook_deliveries (
    id              bigserial   PRIMARY KEY,
    subscription_id text        NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    notification_id bigint      NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        int         NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    UNIQUE (notification_id, subscription_id)
);
-- The deliverer's work list.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
-- A subscription's delivery log, newest first.
CREATE INDEX webhook_deliveries_subscription_idx ON webhook_deliveries (subscription_id, id DESC);

-- webhook_attempts: every HTTP attempt of a delivery, with its outcome.
CREATE TABLE webhook_attempts (
    delivery_id bigint      NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     int         NOT NULL,
    at          timestamptz NOT NULL,
    status      int         NOT NULL DEFAULT 0, -- the HTTP status; 0 when no response came
    error       text        NOT NULL DEFAULT '',
    duration_ms int         NOT NULL,
    node        text        NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

-- +goose StatementBegin
CREATE FUNCTION notifications_fan_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (subscription_id, notification_id, next_attempt_at)
    SELECT s.id, NEW.id, NEW.at FROM webhook_subscriptions s
    WHERE s.enabled AND NEW.type = ANY (s.events);
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER notifications_fan_out AFTER INSERT ON notifications
    FOR EACH ROW EXECUTE FUNCTION notifications_fan_out();

-- Campaign outcomes, from the audit trail every campaign change writes in
-- the transaction that made it: a gate that paused or aborted the campaign
-- (the campaign row already holds the state the gate chose), a stage that
-- waits for an operator's approval, completion,
-- an operator's abort, the end of a rollback.
-- +goose StatementBegin
CREATE FUNCTION notify_campaign_history() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kind text;
    camp record;
BEGIN
    SELECT c.id, c.name, c.state, c.stage, c.version INTO camp FROM campaigns c WHERE c.id = NEW.campaign_id;
    kind := CASE
        WHEN NEW.action = 'gate_breached' AND camp.state = 'paused' THEN 'campaign.paused_by_gate'
        WHEN NEW.action = 'gate_breached' AND camp.state = 'aborted' THEN 'campaign.aborted_by_gate'
        WHEN NEW.action = 'awaiting_approval' THEN 'campaign.awaiting_approval'
        WHEN NEW.action = 'complete' THEN 'campaign.completed'
        WHEN NEW.action = 'abort' THEN 'campaign.aborted'
        WHEN NEW.action = 'rolled_back' THEN 'campaign.rolled_back'
    END;
    IF kind IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO notifications (type, payload, at) VALUES (kind, jsonb_build_object(
        'campaign_id', camp.id, 'name', camp.name, 'state', camp.state, 'stage', camp.stage,
        'version', camp.version, 'actor', NEW.actor, 'history_id', NEW.id,
        'reason', coalesce(NEW.detail->>'reason', ''), 'gate', NEW.detail->'gate'), NEW.at);
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER notify_campaign_history AFTER INSERT ON campaign_history
    FOR EACH ROW EXECUTE FUNCTION notify_campaign_history();

-- A learned verdict flips: a firmware flagged, or cleared.
-- +goose StatementBegin
CREATE FUNCTION notify_verdict_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notifications (type, payload, at) VALUES (
        CASE NEW.change WHEN 'flagged' THEN 'firmware.flagged' ELSE 'firmware.cleared' END,
        jsonb_build_object('model', NEW.model, 'firmware', NEW.firmware, 'flag', NEW.flag,
            'rate', NEW.rate, 'baseline', NEW.baseline), NEW.at);
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER notify_verdict_history AFTER INSERT ON firmware_verdict_history
    FOR EACH ROW EXECUTE FUNCTION notify_verdict_history();

-- Devices offline longer than -notify-offline-after: the watch (one
-- replica at a time) tells of the devices whose disconnect crossed that age
-- since its last round, found through this index, and keeps a watermark
-- so that a round missed or made by another replica neither repeats nor
-- skips a device.
CREATE INDEX devices_offline_since_idx ON devices (disconnected_at) WHERE state = 'active' AND NOT online;
CREATE TABLE notify_watermarks (
    name text        PRIMARY KEY,
    at   timestamptz NOT NULL
);
-- The models whose share of devices offline longer than the threshold is
-- at or above -notify-model-offline-share: model.offline was sent, and
-- model.back_online is sent when the share falls below it again.
CREATE TABLE notify_models_offline (
    model   text        PRIMARY KEY,
    since   timestamptz NOT NULL,
    offline int         NOT NULL,
    devices int         NOT NULL
);
