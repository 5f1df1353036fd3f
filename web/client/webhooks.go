package client

import (
	"context"
	"fmt"
	"net/url"

	"github.com/fleetd/fleetd/notify"
)

// CreateWebhook subscribes url to notification types (POST /webhooks); the
// answer carries the signing secret, shown this once.
func (c *Client) CreateWebhook(ctx context.Context, spec notify.Spec) (notify.Subscription, error) {
	var s notify.Subscription
	err := c.do(ctx, "POST", "/api/v1/webhooks", spec, &s)
	return s, err
}

// Webhooks lists the subscriptions (GET /webhooks).
func (c *Client) Webhooks(ctx context.Context) ([]notify.Subscription, error) {
	var out struct {
		Webhooks []notify.Subscription `json:"webhooks"`
	}
	err := c.do(ctx, "GET", "/api/v1/webhooks", nil, &out)
	return out.Webhooks, err
}

// UpdateWebhook patches a subscription (PATCH /webhooks/{id}).
func (c *Client) UpdateWebhook(ctx context.Context, id string, p notify.Patch) (notify.Subscription, error) {
	var s notify.Subscription
	err := c.do(ctx, "PATCH", "/api/v1/webhooks/"+url.PathEscape(id), p, &s)
	return s, err
}

// DeleteWebhook removes a subscription (DELETE /webhooks/{id}).
func (c *Client) DeleteWebhook(ctx context.Context, id string) error {
	return c.do(ctx, "DELETE", "/api/v1/webhooks/"+url.PathEscape(id), nil, nil)
}

// TestWebhook sends a webhook.test notification to one subscription.
func (c *Client) TestWebhook(ctx context.Context, id string) (notify.Delivery, error) {
	var d notify.Delivery
	err := c.do(ctx, "POST", "/api/v1/webhooks/"+url.PathEscape(id)+"/test", nil, &d)
	return d, err
}

// WebhookDeliveries reads a subscription's delivery log, newest first
// (limit 0: the server's page size; before 0: from the newest).
func (c *Client) WebhookDeliveries(ctx context.Context, id string, limit int, before int64) ([]notify.Delivery, error) {
	q := url.Values{}
	if limit > 0 {
		q.Set("limit", fmt.Sprint(limit))
	}
	if before > 0 {
		q.Set("before", fmt.Sprint(before))
	}
	var out struct {
		Deliveries []notify.Delivery `json:"deliveries"`
	}
	err := c.do(ctx, "GET", "/api/v1/webhooks/"+url.PathEscape(id)+"/deliveries?"+q.Encode(), nil, &out)
	return out.Deliveries, err
}
