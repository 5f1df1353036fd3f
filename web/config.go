package web

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"os"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/devconfig"
)

// Configs is what the configuration endpoints need (devconfig.Service).
// Writes return a *devconfig.ValidationError naming "config" or "scope";
// device calls return errors wrapping fleet.ErrNotFound (no such device)
// and devconfig.ErrGone; layer calls errors wrapping devconfig.ErrNotFound.
type Configs interface {
	Get(ctx context.Context, deviceID string) (devconfig.View, error)
	PutDevice(ctx context.Context, deviceID string, doc json.RawMessage) (devconfig.View, error)
	PatchDevice(ctx context.Context, deviceID string, patch json.RawMessage) (devconfig.View, error)
	Layers(ctx context.Context) ([]devconfig.Layer, error)
	Layer(ctx context.Context, scope string) (devconfig.Layer, error)
	PutLayer(ctx context.Context, scope string, doc json.RawMessage) (devconfig.LayerChange, error)
	PatchLayer(ctx context.Context, scope string, patch json.RawMessage) (devconfig.LayerChange, error)
	DeleteLayer(ctx context.Context, scope string) (devconfig.LayerChange, error)
}

func init() {
	RegisterError(devconfig.ErrNotFound, http.StatusNotFound, "not_found")
	RegisterError(devconfig.ErrGone, http.StatusConflict, "decommissioned")
}

// maxConfigBody bounds a configuration request body before the document's
// own limit (16 KiB compacted) is checked: indentation is allowed.
const maxConfigBody = 256 << 10

// MountConfig adds the configuration endpoints: GET, PUT and PATCH
// /devices/{id}/config (the device's view; PUT replaces its own layer,
// PATCH merges into it, RFC 7396), GET /config/layers, and GET, PUT, PATCH
// and DELETE /config/layers/{scope}. Request bodies are the document
// itself (PUT) or a merge patch (PATCH).
func (s *Server) MountConfig(c Configs) {
	fail := func(w http.ResponseWriter, r *http.Request, err error) { writeError(w, r, s.opts.Logger, err) }
	s.mount(func(_, api chi.Router) {
		api.Get("/devices/{id}/config", func(w http.ResponseWriter, r *http.Request) {
			v, err := c.Get(r.Context(), chi.URLParam(r, "id"))
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, v)
		})
		deviceWrite := func(write func(context.Context, string, json.RawMessage) (devconfig.View, error)) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				body, err := readConfigBody(r)
				if err != nil {
					fail(w, r, err)
					return
				}
				v, err := write(r.Context(), chi.URLParam(r, "id"), body)
				if err != nil {
					fail(w, r, err)
					return
				}
				writeJSON(w, http.StatusOK, v)
			}
		}
		api.Put("/devices/{id}/config", deviceWrite(func(ctx context.Context, id string, b json.RawMessage) (devconfig.View, error) {
			return c.PutDevice(ctx, id, b)
		}))
		api.Patch("/devices/{id}/config", deviceWrite(func(ctx context.Context, id string, b json.RawMessage) (devconfig.View, error) {
			return c.PatchDevice(ctx, id, b)
		}))
		api.Get("/config/layers", func(w http.ResponseWriter, r *http.Request) {
			ls, err := c.Layers(r.Context())
			if err != nil {
				fail(w, r, err)
				return
			}
			if ls == nil {
				ls = []devconfig.Layer{}
			}
			writeJSON(w, http.StatusOK, struct {
				Layers []devconfig.Layer `json:"layers"`
			}{ls})
		})
		api.Get("/config/layers/{scope}", func(w http.ResponseWriter, r *http.Request) {
			l, err := c.Layer(r.Context(), scopeParam(r))
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, l)
		})
		layerWrite := func(write func(context.Context, string, json.RawMessage) (devconfig.LayerChange, error)) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				body, err := readConfigBody(r)
				if err != nil {
					fail(w, r, err)
					return
				}
				ch, err := write(r.Context(), scopeParam(r), body)
				if err != nil {
					fail(w, r, err)
					return
				}
				writeJSON(w, http.StatusOK, ch)
			}
		}
		api.Put("/config/layers/{scope}", layerWrite(func(ctx context.Context, scope string, b json.RawMessage) (devconfig.LayerChange, error) {
			return c.PutLayer(ctx, scope, b)
		}))
		api.Patch("/config/layers/{scope}", layerWrite(func(ctx context.Context, scope string, b json.RawMessage) (devconfig.LayerChange, error) {
			return c.PatchLayer(ctx, scope, b)
		}))
		api.Delete("/config/layers/{scope}", func(w http.ResponseWriter, r *http.Request) {
			ch, err := c.DeleteLayer(r.Context(), scopeParam(r))
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, ch)
		})
	})
}

// scopeParam is the {scope} of the path, unescaped whether or not the
// client escaped its ':', ',' and '='.
func scopeParam(r *http.Request) string {
	p := chi.URLParam(r, "scope")
	if u, err := url.PathUnescape(p); err == nil {
		return u
	}
	return p
}

// readConfigBody reads a configuration document or merge patch; the
// service checks what it is.
func readConfigBody(r *http.Request) (json.RawMessage, error) {
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxConfigBody))
	var maxErr *http.MaxBytesError
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return nil, bodyTimeout(err)
	case errors.As(err, &maxErr):
		return nil, BadRequest("config", "request body larger than 256 KiB")
	case err != nil:
		return nil, BadRequest("body", "cannot read the request body: "+err.Error())
	}
	return body, nil
}
