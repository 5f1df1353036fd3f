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
	"strings"
	"time"

	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/telemetry"
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
	return c.send(req, out)
}

func (c *Client) send(req *http.Request, out any) error {
	method, path := req.Method, req.URL.Path
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
		return errorOf(resp.StatusCode, data)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s %s: decode response: %w", method, path, err)
	}
	return nil
}

// errorOf decodes the API's JSON error body.
func errorOf(status int, data []byte) error {
	var e struct{ Error Error }
	if json.Unmarshal(data, &e) != nil {
		return &Error{Status: status, Message: string(data)}
	}
	e.Error.Status = status
	return &e.Error
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
	v := pageQuery(cursor, limit)
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

// FleetHistory returns connects, disconnects and refusals per step ("1m",
// "5m", "1h" or "1d"; empty for 1m) between from and to (a zero to is now, a
// zero from makes 60 buckets).
func (c *Client) FleetHistory(ctx context.Context, from, to time.Time, step string) (fleet.FleetHistory, error) {
	v := url.Values{}
	if !from.IsZero() {
		v.Set("from", from.Format(time.RFC3339Nano))
	}
	if !to.IsZero() {
		v.Set("to", to.Format(time.RFC3339Nano))
	}
	if step != "" {
		v.Set("step", step)
	}
	var h fleet.FleetHistory
	err := c.do(ctx, http.MethodGet, "/api/v1/fleet/history?"+v.Encode(), nil, &h)
	return h, err
}

// FleetLinks returns the fleet's radio links over window (0: the policy's).
func (c *Client) FleetLinks(ctx context.Context, window time.Duration) (fleet.LinkStats, error) {
	path := "/api/v1/fleet/links"
	if window > 0 {
		path += "?window=" + strconv.Itoa(int(window.Seconds()))
	}
	var st fleet.LinkStats
	err := c.do(ctx, http.MethodGet, path, nil, &st)
	return st, err
}

// UploadFirmware uploads an image (raw body) for the given models.
func (c *Client) UploadFirmware(ctx context.Context, version string, models []string, image io.Reader) (firmware.Artifact, error) {
	q := url.Values{"version": {version}, "models": {strings.Join(models, ",")}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+"/api/v1/firmware?"+q.Encode(), image)
	if err != nil {
		return firmware.Artifact{}, err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("Content-Type", "application/octet-stream")
	var art firmware.Artifact
	err = c.send(req, &art)
	return art, err
}

// Firmware lists the uploaded images.
func (c *Client) Firmware(ctx context.Context) ([]firmware.Artifact, error) {
	var out struct{ Firmware []firmware.Artifact }
	err := c.do(ctx, http.MethodGet, "/api/v1/firmware", nil, &out)
	return out.Firmware, err
}

// SigningKey returns the base64 ed25519 key devices verify images with.
func (c *Client) SigningKey(ctx context.Context) (string, error) {
	var out struct {
		PublicKey string `json:"public_key"`
	}
	err := c.do(ctx, http.MethodGet, "/api/v1/firmware/signing-key", nil, &out)
	return out.PublicKey, err
}

// CreateCampaign creates a draft campaign.
func (c *Client) CreateCampaign(ctx context.Context, spec firmware.Spec) (firmware.CampaignView, error) {
	var v firmware.CampaignView
	err := c.do(ctx, http.MethodPost, "/api/v1/campaigns", spec, &v)
	return v, err
}

// Campaign returns a campaign with its per-stage counts.
func (c *Client) Campaign(ctx context.Context, id string) (firmware.CampaignView, error) {
	var v firmware.CampaignView
	err := c.do(ctx, http.MethodGet, "/api/v1/campaigns/"+url.PathEscape(id), nil, &v)
	return v, err
}

// Campaigns lists every campaign.
func (c *Client) Campaigns(ctx context.Context) ([]firmware.CampaignView, error) {
	var out struct{ Campaigns []firmware.CampaignView }
	err := c.do(ctx, http.MethodGet, "/api/v1/campaigns", nil, &out)
	return out.Campaigns, err
}

// CampaignAction starts, pauses, resumes, aborts or rolls back a campaign.
func (c *Client) CampaignAction(ctx context.Context, id, action string) (firmware.CampaignView, error) {
	var v firmware.CampaignView
	err := c.do(ctx, http.MethodPost, "/api/v1/campaigns/"+url.PathEscape(id)+"/"+action, nil, &v)
	return v, err
}

// CampaignHistory returns a campaign's audit trail.
func (c *Client) CampaignHistory(ctx context.Context, id string) ([]firmware.HistoryEntry, error) {
	var out struct{ History []firmware.HistoryEntry }
	err := c.do(ctx, http.MethodGet, "/api/v1/campaigns/"+url.PathEscape(id)+"/history", nil, &out)
	return out.History, err
}

// CampaignDevices lists a campaign's devices and their jobs.
func (c *Client) CampaignDevices(ctx context.Context, id string) ([]firmware.CampaignDevice, error) {
	var out struct{ Devices []firmware.CampaignDevice }
	err := c.do(ctx, http.MethodGet, "/api/v1/campaigns/"+url.PathEscape(id)+"/devices", nil, &out)
	return out.Devices, err
}

// TelemetryQuery selects one metric of a device: raw points (Step "") or
// rollups ("1m", "1h"), over [From, To) (zero: the last hour).
type TelemetryQuery struct {
	Metric   string
	From, To time.Time
	Step     string
}

// Telemetry reads one metric of a device over time.
func (c *Client) Telemetry(ctx context.Context, id string, q TelemetryQuery) (telemetry.Series, error) {
	v := url.Values{"metric": {q.Metric}}
	if q.Step != "" {
		v.Set("step", q.Step)
	}
	if !q.From.IsZero() {
		v.Set("from", q.From.Format(time.RFC3339Nano))
	}
	if !q.To.IsZero() {
		v.Set("to", q.To.Format(time.RFC3339Nano))
	}
	var s telemetry.Series
	err := c.do(ctx, http.MethodGet, "/api/v1/devices/"+url.PathEscape(id)+"/telemetry?"+v.Encode(), nil, &s)
	return s, err
}

// FleetTelemetry aggregates the latest value of a metric per device by
// groupBy: firmware, model, channel, bssid, or "" for the whole fleet.
func (c *Client) FleetTelemetry(ctx context.Context, metric, groupBy string) (telemetry.Summary, error) {
	v := url.Values{"metric": {metric}}
	if groupBy != "" {
		v.Set("group_by", groupBy)
	}
	var s telemetry.Summary
	err := c.do(ctx, http.MethodGet, "/api/v1/fleet/telemetry?"+v.Encode(), nil, &s)
	return s, err
}

// SendCommand sends a command to a device (POST /devices/{id}/commands).
func (c *Client) SendCommand(ctx context.Context, deviceID string, r command.Request) (command.Command, error) {
	var cmd command.Command
	err := c.do(ctx, http.MethodPost, "/api/v1/devices/"+url.PathEscape(deviceID)+"/commands", r, &cmd)
	return cmd, err
}

// Command returns a device's command. With wait > 0 (whole seconds, at most
// 60) the server answers once the state is final or the wait is over.
func (c *Client) Command(ctx context.Context, deviceID, id string, wait time.Duration) (command.Command, error) {
	path := "/api/v1/devices/" + url.PathEscape(deviceID) + "/commands/" + url.PathEscape(id)
	var cmd command.Command
	if wait <= 0 {
		err := c.do(ctx, http.MethodGet, path, nil, &cmd)
		return cmd, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path+"?wait="+strconv.Itoa(int(wait.Seconds())), nil)
	if err != nil {
		return cmd, err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	// The client's own timeout would cut a long wait.
	long := *c
	hc := *c.http
	hc.Timeout = wait + c.http.Timeout
	long.http = &hc
	err = long.send(req, &cmd)
	return cmd, err
}

// CommandPage is one page of a device's commands, newest first.
type CommandPage struct {
	Commands   []command.Command `json:"commands"`
	NextCursor string            `json:"next_cursor"`
}

// Commands lists a device's recent commands (limit 0: the server's default).
func (c *Client) Commands(ctx context.Context, deviceID, cursor string, limit int) (CommandPage, error) {
	v := pageQuery(cursor, limit)
	var p CommandPage
	err := c.do(ctx, http.MethodGet, "/api/v1/devices/"+url.PathEscape(deviceID)+"/commands?"+v.Encode(), nil, &p)
	return p, err
}

// pageQuery is the query of a paged list: its cursor and limit, when set.
func pageQuery(cursor string, limit int) url.Values {
	v := url.Values{}
	if cursor != "" {
		v.Set("cursor", cursor)
	}
	if limit > 0 {
		v.Set("limit", strconv.Itoa(limit))
	}
	return v
}
