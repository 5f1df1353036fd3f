package notify

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

var (
	// ErrNotFound: no such subscription.
	ErrNotFound = errors.New("not found")
	// ErrTooMany: the subscription cap is reached.
	ErrTooMany = errors.New("too many webhook subscriptions")
)

// Limits of what an admin may make fleetd keep and do: every notification
// fans out to every subscription of its type, so their number bounds the
// deliveries one change costs.
const (
	MaxSubscriptions  = 100
	maxURLLength      = 2048
	maxDescription    = 200
	maxDeliveriesPage = 200
)

// Subscription is a webhook: where to POST which notification types.
type Subscription struct {
	ID          string `json:"id"`
	URL         string `json:"url"`
	Description string `json:"description"`
	Events      []Type `json:"events"`
	Enabled     bool   `json:"enabled"`
	// ConsecutiveFailures counts failed attempts in a row; at the
	// deliverer's limit the subscription is disabled, DisabledReason says why.
	ConsecutiveFailures int        `json:"consecutive_failures"`
	DisabledReason      string     `json:"disabled_reason,omitempty"`
	DisabledAt          *time.Time `json:"disabled_at,omitempty"`
	CreatedBy           string     `json:"created_by"`
	CreatedAt           time.Time  `json:"created_at"`
	UpdatedAt           time.Time  `json:"updated_at"`
	// Secret is the HMAC-SHA256 key of the signatures, in the answer to the
	// creation only: it is never shown again.
	Secret string `json:"secret,omitempty"`
}

// Spec is what an admin sends to create a subscription.
type Spec struct {
	URL         string `json:"url"`
	Events      []Type `json:"events"`
	Description string `json:"description"`
}

// Patch changes a subscription; nil fields are left alone. Enabling a
// disabled subscription resets its failure count.
type Patch struct {
	URL         *string `json:"url"`
	Events      *[]Type `json:"events"`
	Description *string `json:"description"`
	Enabled     *bool   `json:"enabled"`
}

func validURL(raw string) error {
	if len(raw) > maxURLLength {
		return &ValidationError{"url", fmt.Sprintf("longer than %d characters", maxURLLength)}
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return &ValidationError{"url", "must be an absolute http:// or https:// URL"}
	}
	if u.User != nil {
		return &ValidationError{"url", "must not carry credentials: deliveries are authenticated by their signature"}
	}
	return nil
}

func validEvents(events []Type) ([]Type, error) {
	if len(events) == 0 {
		return nil, &ValidationError{"events", "name at least one notification type (" + typeNames() + ")"}
	}
	out := make([]Type, 0, len(events))
	for _, t := range events {
		if !Known(t) {
			return nil, &ValidationError{"events", fmt.Sprintf("%q is not a notification type (%s)", t, typeNames())}
		}
		if !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	slices.Sort(out)
	return out, nil
}

func validDescription(d string) error {
	if len(d) > maxDescription {
		return &ValidationError{"description", fmt.Sprintf("longer than %d bytes", maxDescription)}
	}
	if strings.ContainsFunc(d, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return &ValidationError{"description", "must not contain control characters"}
	}
	return nil
}

// Store keeps subscriptions, the outbox and the delivery log in PostgreSQL.
type Store struct {
	pool *pgxpool.Pool
}

// NewStore returns a store on pool.
func NewStore(pool *pgxpool.Pool) *Store { return &Store{pool: pool} }

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

const subscriptionColumns = `id, url, description, events, enabled, consecutive_failures, disabled_reason, disabled_at, created_by, created_at, updated_at`

func scanSubscription(r pgx.Row) (Subscription, error) {
	var s Subscription
	var events []string
	err := r.Scan(&s.ID, &s.URL, &s.Description, &events, &s.Enabled, &s.ConsecutiveFailures, &s.DisabledReason, &s.DisabledAt,
		&s.CreatedBy, &s.CreatedAt, &s.UpdatedAt)
	for _, e := range events {
		s.Events = append(s.Events, Type(e))
	}
	return s, err
}

// Create stores a subscription with a fresh secret, returned once in the
// answer. Past MaxSubscriptions it returns ErrTooMany.
func (s *Store) Create(ctx context.Context, spec Spec, actor string) (Subscription, error) {
	if err := validURL(spec.URL); err != nil {
		return Subscription{}, err
	}
	events, err := validEvents(spec.Events)
	if err != nil {
		return Subscription{}, err
	}
	if err := validDescription(spec.Description); err != nil {
		return Subscription{}, err
	}
	id, secret := "wh_"+randomHex(8), "whsec_"+randomHex(32)
	var sub Subscription
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// Serialise creations so that two at once cannot pass the cap.
		if _, err := tx.Exec(ctx, `LOCK TABLE webhook_subscriptions IN SHARE ROW EXCLUSIVE MODE`); err != nil {
			return err
		}
		var n int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM webhook_subscriptions`).Scan(&n); err != nil {
			return err
		}
		if n >= MaxSubscriptions {
			return fmt.Errorf("%w: at most %d", ErrTooMany, MaxSubscriptions)
		}
		sub, err = scanSubscription(tx.QueryRow(ctx, `INSERT INTO webhook_subscriptions (id, url, description, events, secret, created_by)
			VALUES ($1, $2, $3, $4, $5, $6) RETURNING `+subscriptionColumns, id, spec.URL, spec.Description, typeStrings(events), secret, actor))
		return err
	})
	if err != nil {
		return Subscription{}, fmt.Errorf("create webhook: %w", err)
	}
	sub.Secret = secret
	return sub, nil
}

func typeStrings(ts []Type) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = string(t)
	}
	return out
}

// List returns every subscription, oldest first, without secrets.
func (s *Store) List(ctx context.Context) ([]Subscription, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+subscriptionColumns+` FROM webhook_subscriptions ORDER BY created_at, id`)
	if err != nil {
		return nil, fmt.Errorf("list webhooks: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Subscription, error) { return scanSubscription(r) })
	if err != nil {
		return nil, fmt.Errorf("list webhooks: %w", err)
	}
	return out, nil
}

// Get returns one subscription without its secret.
func (s *Store) Get(ctx context.Context, id string) (Subscription, error) {
	sub, err := scanSubscription(s.pool.QueryRow(ctx, `SELECT `+subscriptionColumns+` FROM webhook_subscriptions WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return Subscription{}, fmt.Errorf("webhook %q: %w", id, ErrNotFound)
	}
	return sub, err
}

// Update applies a patch. Enabling clears the failure count and the
// reason it was disabled for; disabling by hand fails its pending
// deliveries at their next claim.
func (s *Store) Update(ctx context.Context, id string, p Patch) (Subscription, error) {
	var events []string
	if p.URL != nil {
		if err := validURL(*p.URL); err != nil {
			return Subscription{}, err
		}
	}
	if p.Events != nil {
		ev, err := validEvents(*p.Events)
		if err != nil {
			return Subscription{}, err
		}
		events = typeStrings(ev)
	}
	if p.Description != nil {
		if err := validDescription(*p.Description); err != nil {
			return Subscription{}, err
		}
	}
	sub, err := scanSubscription(s.pool.QueryRow(ctx, `UPDATE webhook_subscriptions SET
			url = coalesce($2, url), events = coalesce($3, events), description = coalesce($4, description),
			enabled = coalesce($5, enabled),
			consecutive_failures = CASE WHEN $5 AND NOT enabled THEN 0 ELSE consecutive_failures END,
			disabled_reason = CASE WHEN $5 THEN '' WHEN $5 = false AND enabled THEN 'disabled by an admin' ELSE disabled_reason END,
			disabled_at = CASE WHEN $5 THEN NULL WHEN $5 = false AND enabled THEN now() ELSE disabled_at END,
			updated_at = now()
		WHERE id = $1 RETURNING `+subscriptionColumns, id, p.URL, events, p.Description, p.Enabled))
	if errors.Is(err, pgx.ErrNoRows) {
		return Subscription{}, fmt.Errorf("webhook %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return Subscription{}, fmt.Errorf("update webhook: %w", err)
	}
	return sub, nil
}

// Delete removes a subscription and its delivery log.
func (s *Store) Delete(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM webhook_subscriptions WHERE id = $1`, id)
	if err != nil {
		return fmt.Errorf("delete webhook: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("webhook %q: %w", id, ErrNotFound)
	}
	return nil
}

// Test queues a webhook.test notification for this subscription only
// (webhook.test is not a type subscriptions may list, so the fan-out adds
// nobody else).
func (s *Store) Test(ctx context.Context, id, actor string) (Delivery, error) {
	d := Delivery{Type: WebhookTest, Log: []Attempt{}}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var exists bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM webhook_subscriptions WHERE id = $1)`, id).Scan(&exists); err != nil {
			return err
		}
		if !exists {
			return fmt.Errorf("webhook %q: %w", id, ErrNotFound)
		}
		payload, _ := json.Marshal(map[string]string{"subscription_id": id, "actor": actor})
		d.Payload = payload
		if err := tx.QueryRow(ctx, `INSERT INTO notifications (type, payload) VALUES ($1, $2) RETURNING id`, WebhookTest, payload).Scan(&d.NotificationID); err != nil {
			return err
		}
		return tx.QueryRow(ctx, `INSERT INTO webhook_deliveries (subscription_id, notification_id) VALUES ($1, $2)
			RETURNING id, state, attempts, created_at, next_attempt_at`, id, d.NotificationID).Scan(&d.ID, &d.State, &d.Attempts, &d.CreatedAt, &d.NextAttemptAt)
	})
	if err != nil {
		return Delivery{}, fmt.Errorf("test webhook: %w", err)
	}
	return d, nil
}

// Publish writes a notification to the outbox (and so to every subscribed
// webhook). q is the pool, or the transaction of the change it tells of.
func Publish(ctx context.Context, q interface {
	Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
}, t Type, payload any) error {
	b, err := json.Marshal(payload)
	if err != nil {
		return fmt.Errorf("notification %s: %w", t, err)
	}
	if _, err := q.Exec(ctx, `INSERT INTO notifications (type, payload) VALUES ($1, $2)`, string(t), b); err != nil {
		return fmt.Errorf("notification %s: %w", t, err)
	}
	return nil
}

// Delivery is one notification's delivery to one subscription, with its
// attempts, as the delivery log shows it.
type Delivery struct {
	ID             int64           `json:"id"`
	NotificationID int64           `json:"notification_id"`
	Type           Type            `json:"type"`
	Payload        json.RawMessage `json:"payload,omitempty"`
	State          string          `json:"state"` // pending, delivered, failed
	Attempts       int             `json:"attempts"`
	NextAttemptAt  *time.Time      `json:"next_attempt_at,omitempty"` // while pending
	CreatedAt      time.Time       `json:"created_at"`
	FinishedAt     *time.Time      `json:"finished_at,omitempty"`
	Log            []Attempt       `json:"log"`
}

// Attempt is one HTTP request of a delivery.
type Attempt struct {
	Attempt    int       `json:"attempt"`
	At         time.Time `json:"at"`
	Status     int       `json:"status"` // 0: no response
	Error      string    `json:"error,omitempty"`
	DurationMS int       `json:"duration_ms"`
	Node       string    `json:"node"`
}

// Deliveries returns a subscription's delivery log, newest first: at most
// limit deliveries (1..200) with an id below before (0: from the newest).
func (s *Store) Deliveries(ctx context.Context, id string, limit int, before int64) ([]Delivery, error) {
	if _, err := s.Get(ctx, id); err != nil {
		return nil, err
	}
	if limit <= 0 || limit > maxDeliveriesPage {
		limit = maxDeliveriesPage
	}
	rows, err := s.pool.Query(ctx, `
		SELECT d.id, d.notification_id, n.type, n.payload, d.state, d.attempts,
			CASE WHEN d.state = 'pending' THEN d.next_attempt_at END, d.created_at, d.finished_at,
			coalesce((SELECT json_agg(json_build_object('attempt', a.attempt, 'at', a.at, 'status', a.status, 'error', a.error,
				'duration_ms', a.duration_ms, 'node', a.node) ORDER BY a.attempt)
				FROM webhook_attempts a WHERE a.delivery_id = d.id), '[]')
		FROM webhook_deliveries d JOIN notifications n ON n.id = d.notification_id
		WHERE d.subscription_id = $1 AND ($3 = 0 OR d.id < $3)
		ORDER BY d.id DESC LIMIT $2`, id, limit, before)
	if err != nil {
		return nil, fmt.Errorf("webhook deliveries: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Delivery, error) {
		var d Delivery
		var log []byte
		err := r.Scan(&d.ID, &d.NotificationID, &d.Type, &d.Payload, &d.State, &d.Attempts, &d.NextAttemptAt, &d.CreatedAt, &d.FinishedAt, &log)
		if err == nil {
			err = json.Unmarshal(log, &d.Log)
		}
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("webhook deliveries: %w", err)
	}
	return out, nil
}
