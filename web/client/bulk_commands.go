package client

import (
	"context"
	"net/http"
	"net/url"

	"github.com/fleetd/fleetd/command"
)

// SendBulk sends one command to every device a selector matches
// (POST /api/v1/commands), paced; it returns the bulk as created.
func (c *Client) SendBulk(ctx context.Context, r command.BulkRequest) (command.Bulk, error) {
	var b command.Bulk
	err := c.do(ctx, http.MethodPost, "/api/v1/commands", r, &b)
	return b, err
}

// Bulk returns a bulk command and its summary.
func (c *Client) Bulk(ctx context.Context, id string) (command.Bulk, error) {
	var b command.Bulk
	err := c.do(ctx, http.MethodGet, "/api/v1/commands/"+url.PathEscape(id), nil, &b)
	return b, err
}

// CancelBulk stops a running bulk command.
func (c *Client) CancelBulk(ctx context.Context, id string) (command.Bulk, error) {
	var b command.Bulk
	err := c.do(ctx, http.MethodPost, "/api/v1/commands/"+url.PathEscape(id)+"/cancel", nil, &b)
	return b, err
}

// BulkPage is one page of bulk commands, newest first.
type BulkPage struct {
	Bulks      []command.Bulk `json:"bulks"`
	NextCursor string         `json:"next_cursor"`
}

// Bulks lists bulk commands (limit 0: the server's default).
func (c *Client) Bulks(ctx context.Context, cursor string, limit int) (BulkPage, error) {
	var p BulkPage
	err := c.do(ctx, http.MethodGet, "/api/v1/commands?"+pageQuery(cursor, limit).Encode(), nil, &p)
	return p, err
}

// BulkDevicePage is one page of a bulk's devices and their results.
type BulkDevicePage struct {
	Devices    []command.BulkTarget `json:"devices"`
	NextCursor string               `json:"next_cursor"`
}

// BulkDevices lists a bulk's devices in id order, only those in state when
// it is not empty (limit 0: the server's default).
func (c *Client) BulkDevices(ctx context.Context, id, state, cursor string, limit int) (BulkDevicePage, error) {
	v := pageQuery(cursor, limit)
	if state != "" {
		v.Set("state", state)
	}
	var p BulkDevicePage
	err := c.do(ctx, http.MethodGet, "/api/v1/commands/"+url.PathEscape(id)+"/devices?"+v.Encode(), nil, &p)
	return p, err
}
