package client

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/fleetd/fleetd/auth"
)

// Me says who the client's token is (GET /me).
func (c *Client) Me(ctx context.Context) (auth.Principal, error) {
	var out struct {
		Principal auth.Principal `json:"principal"`
	}
	err := c.do(ctx, "GET", "/api/v1/me", nil, &out)
	return out.Principal, err
}

// Users lists the users (GET /users, admin).
func (c *Client) Users(ctx context.Context) ([]auth.User, error) {
	var out struct {
		Users []auth.User `json:"users"`
	}
	err := c.do(ctx, "GET", "/api/v1/users", nil, &out)
	return out.Users, err
}

// CreateUser adds a user (POST /users, admin).
func (c *Client) CreateUser(ctx context.Context, n auth.NewUser) (auth.User, error) {
	var u auth.User
	err := c.do(ctx, "POST", "/api/v1/users", n, &u)
	return u, err
}

// UpdateUser changes a user's role, password or disabled flag (PATCH
// /users/{id}, admin).
func (c *Client) UpdateUser(ctx context.Context, id string, p auth.UserPatch) (auth.User, error) {
	var u auth.User
	err := c.do(ctx, "PATCH", "/api/v1/users/"+url.PathEscape(id), p, &u)
	return u, err
}

// DeleteUser removes a user (DELETE /users/{id}, admin).
func (c *Client) DeleteUser(ctx context.Context, id string) error {
	return c.do(ctx, "DELETE", "/api/v1/users/"+url.PathEscape(id), nil, nil)
}

// NewKey is what CreateKey sends: ExpiresIn is a duration such as 720h or
// 30d ("" for no expiry).
type NewKey struct {
	Name      string    `json:"name"`
	Role      auth.Role `json:"role"`
	ExpiresIn string    `json:"expires_in,omitempty"`
}

// CreatedKey is a new API key with its token, shown this once.
type CreatedKey struct {
	auth.Key
	Token string `json:"token"`
}

// CreateKey makes an API key (POST /keys, admin).
func (c *Client) CreateKey(ctx context.Context, n NewKey) (CreatedKey, error) {
	var k CreatedKey
	err := c.do(ctx, "POST", "/api/v1/keys", n, &k)
	return k, err
}

// Keys lists the API keys (GET /keys, admin).
func (c *Client) Keys(ctx context.Context) ([]auth.Key, error) {
	var out struct {
		Keys []auth.Key `json:"keys"`
	}
	err := c.do(ctx, "GET", "/api/v1/keys", nil, &out)
	return out.Keys, err
}

// RevokeKey revokes a key at once (DELETE /keys/{id}, admin).
func (c *Client) RevokeKey(ctx context.Context, id string) (auth.Key, error) {
	var k auth.Key
	err := c.do(ctx, "DELETE", "/api/v1/keys/"+url.PathEscape(id), nil, &k)
	return k, err
}

// AuditQuery filters the audit log; zero fields do not filter.
type AuditQuery struct {
	Principal, Method, Route, Target, RequestID, Outcome string
	From, To                                             time.Time
	Cursor                                               string
	Limit                                                int
}

func (q AuditQuery) values() url.Values {
	v := url.Values{}
	for k, s := range map[string]string{"principal": q.Principal, "method": q.Method, "route": q.Route, "target": q.Target,
		"request_id": q.RequestID, "outcome": q.Outcome, "cursor": q.Cursor} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if !q.From.IsZero() {
		v.Set("from", q.From.UTC().Format(time.RFC3339))
	}
	if !q.To.IsZero() {
		v.Set("to", q.To.UTC().Format(time.RFC3339))
	}
	if q.Limit > 0 {
		v.Set("limit", fmt.Sprint(q.Limit))
	}
	return v
}

// AuditPage is one page of the audit log, newest first.
type AuditPage struct {
	Entries    []auth.Entry `json:"entries"`
	NextCursor string       `json:"next_cursor"`
}

// Audit reads a page of the audit log (GET /audit, admin).
func (c *Client) Audit(ctx context.Context, q AuditQuery) (AuditPage, error) {
	var p AuditPage
	err := c.do(ctx, "GET", "/api/v1/audit?"+q.values().Encode(), nil, &p)
	return p, err
}

// ExportAudit copies every entry q matches to w as JSON lines
// (GET /audit?format=jsonl), streamed: no client timeout applies.
func (c *Client) ExportAudit(ctx context.Context, q AuditQuery, w io.Writer) error {
	v := q.values()
	v.Set("format", "jsonl")
	req, err := http.NewRequestWithContext(ctx, "GET", c.base+"/api/v1/audit?"+v.Encode(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := (&http.Client{Transport: c.http.Transport}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return errorOf(resp.StatusCode, data)
	}
	_, err = io.Copy(w, resp.Body)
	return err
}
