// Package client is the typed Go client of fleetd's REST API, used by fleetctl
// and by the end-to-end tests.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

// Client talks to one fleetd.
type Client struct {
	base  string
	token string
	http  *http.Client
}

// New returns a client for the fleetd at base (e.g. http://localhost:8080)
// using the admin token.
func New(base, token string) *Client {
	return &Client{base: base, token: token, http: &http.Client{Timeout: 30 * time.Second}}
}

// Error is an API error response.
type Error struct {
	Status  int
	Code    string `json:"code"`
	Message string `json:"message"`
	Field   string `json:"field"`
}

func (e *Error) Error() string {
	if e.Field != "" {
		return fmt.Sprintf("%d %s (field %s): %s", e.Status, e.Code, e.Field, e.Message)
	}
	return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode >= 400 {
		var e struct{ Error Error }
		if json.Unmarshal(data, &e) != nil {
			return &Error{Status: resp.StatusCode, Message: string(data)}
		}
		e.Error.Status = resp.StatusCode
		return &e.Error
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s %s: decode response: %w", method, path, err)
	}
	return nil
}

// Registration is a registered device with its token, shown once.
type Registration struct {
	Device fleet.Device `json:"device"`
	Token  string       `json:"token"`
}

// RegisterDevice registers a device.
func (c *Client) RegisterDevice(ctx context.Context, n fleet.NewDevice) (Registration, error) {
	var r Registration
	err := c.do(ctx, http.MethodPost, "/api/v1/devices", n, &r)
	return r, err
}

// Device returns one device.
func (c *Client) Device(ctx context.Context, id string) (fleet.Device, error) {
	var d fleet.Device
	err := c.do(ctx, http.MethodGet, "/api/v1/devices/"+url.PathEscape(id), nil, &d)
	return d, err
}

// DeviceQuery filters a device listing.
type DeviceQuery struct {
	Status, Model, Firmware, Protocol, Tag, State, Compat, Cursor string
	Limit                                                         int
}

// DevicePage is one page of devices.
type DevicePage struct {
	Devices    []fleet.Device `json:"devices"`
	NextCursor string         `json:"next_cursor"`
}

// Devices lists one page of devices.
func (c *Client) Devices(ctx context.Context, q DeviceQuery) (DevicePage, error) {
	v := url.Values{}
	for k, s := range map[string]string{"status": q.Status, "model": q.Model, "firmware": q.Firmware, "protocol": q.Protocol,
		"tag": q.Tag, "state": q.State, "compat": q.Compat, "cursor": q.Cursor} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	var p DevicePage
	err := c.do(ctx, http.MethodGet, "/api/v1/devices?"+v.Encode(), nil, &p)
	return p, err
}

// UpdateDevice patches a device.
func (c *Client) UpdateDevice(ctx context.Context, id string, p fleet.Patch) (fleet.Device, error) {
	var d fleet.Device
	err := c.do(ctx, http.MethodPatch, "/api/v1/devices/"+url.PathEscape(id), p, &d)
	return d, err
}

// RotateToken issues a new token for a device.
func (c *Client) RotateToken(ctx context.Context, id string) (string, error) {
	var r struct{ Token string }
	err := c.do(ctx, http.MethodPost, "/api/v1/devices/"+url.PathEscape(id)+"/token", nil, &r)
	return r.Token, err
}

// Decommission revokes a device and ends its session.
func (c *Client) Decommission(ctx context.Context, id string) (fleet.Device, error) {
	var d fleet.Device
	err := c.do(ctx, http.MethodDelete, "/api/v1/devices/"+url.PathEscape(id), nil, &d)
	return d, err
}

// EventPage is one page of a device's events, newest first.
type EventPage struct {
	Events     []fleet.Event `json:"events"`
	NextCursor string        `json:"next_cursor"`
}

// Events lists one page of a device's events.
func (c *Client) Events(ctx context.Context, id, cursor string, limit int) (EventPage, error) {
	v := url.Values{}
	if cursor != "" {
		v.Set("cursor", cursor)
	}
	if limit > 0 {
		v.Set("limit", strconv.Itoa(limit))
	}
	var p EventPage
	err := c.do(ctx, http.MethodGet, "/api/v1/devices/"+url.PathEscape(id)+"/events?"+v.Encode(), nil, &p)
	return p, err
}

// Policy returns the compatibility rules, keepalive policy and verdict thresholds.
func (c *Client) Policy(ctx context.Context) (fleet.Policy, error) {
	var p fleet.Policy
	err := c.do(ctx, http.MethodGet, "/api/v1/compat/rules", nil, &p)
	return p, err
}

// SetPolicy replaces the policy; it applies at once.
func (c *Client) SetPolicy(ctx context.Context, p fleet.Policy) (fleet.Policy, error) {
	var out fleet.Policy
	err := c.do(ctx, http.MethodPut, "/api/v1/compat/rules", p, &out)
	return out, err
}

// Verdicts lists learned and decided firmware verdicts.
func (c *Client) Verdicts(ctx context.Context) ([]fleet.FirmwareVerdict, error) {
	var out struct{ Verdicts []fleet.FirmwareVerdict }
	err := c.do(ctx, http.MethodGet, "/api/v1/compat/verdicts", nil, &out)
	return out.Verdicts, err
}

// DecideVerdict confirms ("confirmed"), overrides ("overridden") or clears ("") a verdict.
func (c *Client) DecideVerdict(ctx context.Context, model, firmware, decision string) error {
	return c.do(ctx, http.MethodPut, "/api/v1/compat/verdicts",
		map[string]string{"model": model, "firmware": firmware, "decision": decision}, nil)
}

// Diagnosis explains a device's problems.
func (c *Client) Diagnosis(ctx context.Context, id string) (fleet.Diagnosis, error) {
	var d fleet.Diagnosis
	err := c.do(ctx, http.MethodGet, "/api/v1/devices/"+url.PathEscape(id)+"/diagnosis", nil, &d)
	return d, err
}

// FleetHealth summarises the fleet.
func (c *Client) FleetHealth(ctx context.Context) (fleet.FleetHealth, error) {
	var h fleet.FleetHealth
	err := c.do(ctx, http.MethodGet, "/api/v1/fleet/health", nil, &h)
	return h, err
}
