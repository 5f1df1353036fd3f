package client

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/url"

	"github.com/fleetd/fleetd/devconfig"
)

// DeviceConfig returns a device's configuration: desired, its own layer,
// reported, the difference and whether they are in sync.
func (c *Client) DeviceConfig(ctx context.Context, deviceID string) (devconfig.View, error) {
	var v devconfig.View
	err := c.do(ctx, http.MethodGet, configPath(deviceID), nil, &v)
	return v, err
}

// SetDeviceConfig replaces a device's own layer with doc (a JSON object).
func (c *Client) SetDeviceConfig(ctx context.Context, deviceID string, doc json.RawMessage) (devconfig.View, error) {
	var v devconfig.View
	err := c.raw(ctx, http.MethodPut, configPath(deviceID), "application/json", doc, &v)
	return v, err
}

// PatchDeviceConfig merges an RFC 7396 merge patch into a device's own layer.
func (c *Client) PatchDeviceConfig(ctx context.Context, deviceID string, patch json.RawMessage) (devconfig.View, error) {
	var v devconfig.View
	err := c.raw(ctx, http.MethodPatch, configPath(deviceID), "application/merge-patch+json", patch, &v)
	return v, err
}

// ConfigLayers returns every configuration layer, in the order they apply.
func (c *Client) ConfigLayers(ctx context.Context) ([]devconfig.Layer, error) {
	var out struct {
		Layers []devconfig.Layer `json:"layers"`
	}
	err := c.do(ctx, http.MethodGet, "/api/v1/config/layers", nil, &out)
	return out.Layers, err
}

// ConfigLayer returns one layer ("fleet", "model:gw-100", "tag:site=lyon",
// "model:gw-100,tag:site=lyon").
func (c *Client) ConfigLayer(ctx context.Context, scope string) (devconfig.Layer, error) {
	var l devconfig.Layer
	err := c.do(ctx, http.MethodGet, layerPath(scope), nil, &l)
	return l, err
}

// SetConfigLayer replaces (or creates) a layer.
func (c *Client) SetConfigLayer(ctx context.Context, scope string, doc json.RawMessage) (devconfig.LayerChange, error) {
	var ch devconfig.LayerChange
	err := c.raw(ctx, http.MethodPut, layerPath(scope), "application/json", doc, &ch)
	return ch, err
}

// PatchConfigLayer merges an RFC 7396 merge patch into a layer.
func (c *Client) PatchConfigLayer(ctx context.Context, scope string, patch json.RawMessage) (devconfig.LayerChange, error) {
	var ch devconfig.LayerChange
	err := c.raw(ctx, http.MethodPatch, layerPath(scope), "application/merge-patch+json", patch, &ch)
	return ch, err
}

// DeleteConfigLayer removes a layer.
func (c *Client) DeleteConfigLayer(ctx context.Context, scope string) (devconfig.LayerChange, error) {
	var ch devconfig.LayerChange
	err := c.do(ctx, http.MethodDelete, layerPath(scope), nil, &ch)
	return ch, err
}

func configPath(deviceID string) string {
	return "/api/v1/devices/" + url.PathEscape(deviceID) + "/config"
}

func layerPath(scope string) string { return "/api/v1/config/layers/" + url.PathEscape(scope) }

// raw sends body as is (a document or a merge patch, not a value to
// marshal).
func (c *Client) raw(ctx context.Context, method, path, contentType string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("Content-Type", contentType)
	return c.send(req, out)
}
