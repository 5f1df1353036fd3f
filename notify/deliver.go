package notify

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// Options tune the deliverer. Zero values take the defaults.
type Options struct {
	Node    string // recorded with each attempt
	Version string // in the User-Agent
	// Timeout bounds one HTTP attempt, connection and response included.
	Timeout time.Duration // default 10s
	// RetryMin and RetryMax bound the backoff between attempts: RetryMin
	// after the first failure, doubling, at most RetryMax, each with a
	// random part (between half and all of it) so that many deliveries to
	// one receiver that failed together do not retry together.
	RetryMin, RetryMax time.Duration // default 10s, 1h
	// MaxAttempts per delivery; then it is failed.
	MaxAttempts int // default 10
	// DisableAfter failed attempts in a row, a subscription is disabled.
	DisableAfter int // default 20
	// Retention of notifications and their deliveries.
	Retention time.Duration // default 30 days
	// Poll is how often due deliveries are looked for.
	Poll time.Duration // default 1s
	// Concurrency bounds the requests in flight from this replica.
	Concurrency int // default 8
	Logger      *slog.Logger
	Registerer  prometheus.Registerer
	// Client makes the requests (default: one that follows no redirect).
	Client *http.Client
}

func (o Options) withDefaults() Options {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.Timeout, 10*time.Second)
	def(&o.RetryMin, 10*time.Second)
	def(&o.RetryMax, time.Hour)
	def(&o.Retention, 30*24*time.Hour)
	def(&o.Poll, time.Second)
	if o.RetryMax < o.RetryMin {
		o.RetryMax = o.RetryMin
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 10
	}
	if o.DisableAfter <= 0 {
		o.DisableAfter = 20
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 8
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Client == nil {
		o.Client = &http.Client{
			// A redirect is an answer, not a delivery: following it would
			// send a signed body somewhere the admin did not name.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	return o
}

// Deliverer sends due deliveries. Every replica runs one.
type Deliverer struct {
	pool     *pgxpool.Pool
	opts     Options
	outcomes *prometheus.CounterVec
}

// NewDeliverer returns a deliverer on pool.
func NewDeliverer(pool *pgxpool.Pool, opts Options) *Deliverer {
	opts = opts.withDefaults()
	d := &Deliverer{pool: pool, opts: opts, outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fleetd_webhook_attempts_total",
		Help: "Webhook delivery attempts by this replica, by outcome (delivered, retry, failed: out of attempts, skipped: subscription disabled).",
	}, []string{"outcome"})}
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(d.outcomes)
	}
	return d
}

// Run delivers until ctx ends, and prunes notifications past retention.
func (d *Deliverer) Run(ctx context.Context) {
	poll := time.NewTicker(d.opts.Poll)
	defer poll.Stop()
	var lastPrune time.Time
	for {
		for {
			n, err := d.DeliverDue(ctx)
			if err != nil && ctx.Err() == nil {
				d.opts.Logger.Warn("webhook deliveries", "error", err)
			}
			if err != nil || n < d.opts.Concurrency {
				break
			}
		}
		if time.Since(lastPrune) > 10*time.Minute {
			if err := d.prune(ctx); err != nil && ctx.Err() == nil {
				d.opts.Logger.Warn("prune notifications", "error", err)
			} else {
				lastPrune = time.Now()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-poll.C:
		}
	}
}

type claimed struct {
	id, notification int64
	attempt          int
	subscription     string
	url, secret      string
	enabled          bool
	typ              Type
	payload          json.RawMessage
	at               time.Time
}

// DeliverDue claims up to Concurrency due deliveries, makes their attempts
// in parallel and records each outcome. It returns how many it claimed.
func (d *Deliverer) DeliverDue(ctx context.Context) (int, error) {
	lease := d.opts.Timeout + 30*time.Second
	rows, err := d.pool.Query(ctx, `
		WITH due AS (
			SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= now()
			ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
		UPDATE webhook_deliveries w SET attempts = w.attempts + 1, next_attempt_at = now() + $2 * interval '1 millisecond'
		FROM due, webhook_subscriptions s, notifications n
		WHERE w.id = due.id AND s.id = w.subscription_id AND n.id = w.notification_id
		RETURNING w.id, w.notification_id, w.attempts, s.id, s.url, s.secret, s.enabled, n.type, n.payload, n.at`,
		d.opts.Concurrency, lease.Milliseconds())
	if err != nil {
		return 0, fmt.Errorf("claim deliveries: %w", err)
	}
	batch, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (claimed, error) {
		var c claimed
		err := r.Scan(&c.id, &c.notification, &c.attempt, &c.subscription, &c.url, &c.secret, &c.enabled, &c.typ, &c.payload, &c.at)
		return c, err
	})
	if err != nil {
		return 0, fmt.Errorf("claim deliveries: %w", err)
	}
	var wg sync.WaitGroup
	for _, c := range batch {
		wg.Go(func() {
			if err := d.attempt(ctx, c); err != nil && ctx.Err() == nil {
				d.opts.Logger.Warn("record webhook attempt", "delivery_id", c.id, "webhook_id", c.subscription, "error", err)
			}
		})
	}
	wg.Wait()
	return len(batch), nil
}

// Body is the JSON a delivery POSTs. ID is the notification's: a receiver
// may get one more than once (delivery is at least once) and should ignore
// an id it has seen.
type Body struct {
	ID   int64           `json:"id"`
	Type Type            `json:"type"`
	At   time.Time       `json:"at"`
	Data json.RawMessage `json:"data"`
}

func (d *Deliverer) attempt(ctx context.Context, c claimed) error {
	if !c.enabled {
		d.outcomes.WithLabelValues("skipped").Inc()
		return d.record(ctx, c, 0, "not sent: the subscription is disabled", 0, true)
	}
	body, _ := json.Marshal(Body{ID: c.notification, Type: c.typ, At: c.at.UTC(), Data: c.payload})
	start := time.Now()
	status, errText := d.post(ctx, c, body)
	if ctx.Err() != nil {
		// Shutting down: the lease runs out and another attempt is made.
		return nil
	}
	return d.record(ctx, c, status, errText, time.Since(start), false)
}

func (d *Deliverer) post(ctx context.Context, c claimed, body []byte) (int, string) {
	ctx, cancel := context.WithTimeout(ctx, d.opts.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return 0, err.Error()
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "fleetd/"+d.opts.Version)
	req.Header.Set(HeaderEvent, string(c.typ))
	req.Header.Set(HeaderDelivery, strconv.FormatInt(c.id, 10))
	req.Header.Set(HeaderSignature, Sign(c.secret, time.Now(), body))
	resp, err := d.opts.Client.Do(req)
	if err != nil {
		return 0, truncate(err.Error(), 300)
	}
	// Read a little of the answer so the connection can be reused, never
	// more: a receiver cannot make fleetd keep its body.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.StatusCode, "HTTP " + resp.Status
	}
	return resp.StatusCode, ""
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// backoff is the wait after the attempt-th failure.
func (d *Deliverer) backoff(attempt int) time.Duration {
	w := d.opts.RetryMin
	for i := 1; i < attempt && w < d.opts.RetryMax; i++ {
		w *= 2
	}
	w = min(w, d.opts.RetryMax)
	return w/2 + rand.N(w/2+1)
}

// record stores an attempt's outcome: delivered, retried later, or failed
// for good; and the subscription's failure count, disabling it at the limit
// (with a webhook.disabled notification to the others, in the same
// transaction).
func (d *Deliverer) record(ctx context.Context, c claimed, status int, errText string, took time.Duration, skipped bool) error {
	ok := errText == "" && !skipped
	// The outcome is recorded even while fleetd shuts down.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	return pgx.BeginFunc(ctx, d.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO webhook_attempts (delivery_id, attempt, at, status, error, duration_ms, node)
			VALUES ($1, $2, now(), $3, $4, $5, $6) ON CONFLICT DO NOTHING`, c.id, c.attempt, status, errText, took.Milliseconds(), d.opts.Node); err != nil {
			return err
		}
		switch {
		case ok:
			d.outcomes.WithLabelValues("delivered").Inc()
			if _, err := tx.Exec(ctx, `UPDATE webhook_deliveries SET state = 'delivered', finished_at = now() WHERE id = $1`, c.id); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `UPDATE webhook_subscriptions SET consecutive_failures = 0 WHERE id = $1 AND consecutive_failures <> 0`, c.subscription)
			return err
		case skipped || c.attempt >= d.opts.MaxAttempts:
			if !skipped {
				d.outcomes.WithLabelValues("failed").Inc()
			}
			if _, err := tx.Exec(ctx, `UPDATE webhook_deliveries SET state = 'failed', finished_at = now() WHERE id = $1`, c.id); err != nil {
				return err
			}
		default:
			d.outcomes.WithLabelValues("retry").Inc()
			if _, err := tx.Exec(ctx, `UPDATE webhook_deliveries SET next_attempt_at = now() + $2 * interval '1 millisecond' WHERE id = $1`,
				c.id, d.backoff(c.attempt).Milliseconds()); err != nil {
				return err
			}
		}
		if skipped {
			return nil
		}
		var failures int
		var disabled bool
		// old is the row before this update: the subscription is disabled
		// now if it was enabled and is not any more.
		err := tx.QueryRow(ctx, `WITH old AS (SELECT enabled FROM webhook_subscriptions WHERE id = $1 FOR UPDATE)
			UPDATE webhook_subscriptions s SET consecutive_failures = s.consecutive_failures + 1,
				enabled = s.enabled AND s.consecutive_failures + 1 < $2,
				disabled_reason = CASE WHEN s.enabled AND s.consecutive_failures + 1 >= $2
					THEN format('%s attempts failed in a row, the last: %s', s.consecutive_failures + 1, $3::text) ELSE s.disabled_reason END,
				disabled_at = CASE WHEN s.enabled AND s.consecutive_failures + 1 >= $2 THEN now() ELSE s.disabled_at END,
				updated_at = now()
			FROM old WHERE s.id = $1 RETURNING s.consecutive_failures, old.enabled AND NOT s.enabled`,
			c.subscription, d.opts.DisableAfter, errText).Scan(&failures, &disabled)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil // deleted meanwhile
		}
		if err != nil {
			return err
		}
		if disabled {
			d.opts.Logger.Warn("webhook disabled after failing deliveries in a row", "webhook_id", c.subscription, "url", c.url,
				"failures", failures, "last_error", errText)
			return Publish(ctx, tx, WebhookDisabled, map[string]any{"subscription_id": c.subscription, "url": c.url,
				"failures": failures, "last_error": errText})
		}
		return nil
	})
}

// prune deletes notifications past retention (their deliveries and
// attempts go with them), in bounded batches.
func (d *Deliverer) prune(ctx context.Context) error {
	for {
		tag, err := d.pool.Exec(ctx, `DELETE FROM notifications WHERE id IN (
			SELECT id FROM notifications WHERE at < now() - $1 * interval '1 millisecond' ORDER BY id LIMIT 5000)`,
			d.opts.Retention.Milliseconds())
		if err != nil {
			return err
		}
		if tag.RowsAffected() < 5000 {
			return nil
		}
	}
}
