package web

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/fleet"
)

// Devices is what the device endpoints need from the registry.
type Devices interface {
	Register(ctx context.Context, n fleet.NewDevice) (fleet.Device, string, error)
	Get(ctx context.Context, id string) (fleet.Device, error)
	List(ctx context.Context, f fleet.Filter) ([]fleet.Device, string, error)
	Update(ctx context.Context, id string, p fleet.Patch) (fleet.Device, error)
	RotateToken(ctx context.Context, id string) (string, error)
	Decommission(ctx context.Context, id string) (fleet.Device, error)
	Events(ctx context.Context, id string, before *fleet.EventCursor, limit int) ([]fleet.Event, error)
}

func init() {
	RegisterError(fleet.ErrNotFound, http.StatusNotFound, "not_found")
	RegisterError(fleet.ErrConflict, http.StatusConflict, "conflict")
}

// MountDevices adds the /api/v1/devices endpoints.
func (s *Server) MountDevices(d Devices) {
	h := &deviceHandlers{d: d, s: s}
	s.mount(func(_, api chi.Router) {
		api.Post("/devices", h.register)
		api.Get("/devices", h.list)
		api.Get("/devices/{id}", h.get)
		api.Patch("/devices/{id}", h.patch)
		api.Delete("/devices/{id}", h.decommission)
		api.Post("/devices/{id}/token", h.rotate)
		api.Get("/devices/{id}/events", h.events)
	})
}

type deviceHandlers struct {
	d Devices
	s *Server
}

func (h *deviceHandlers) fail(w http.ResponseWriter, r *http.Request, err error) {
	writeError(w, r, h.s.opts.Logger, err)
}

// registration is the answer to POST /devices: the token appears here once.
type registration struct {
	Device fleet.Device `json:"device"`
	Token  string       `json:"token"`
}

func (h *deviceHandlers) register(w http.ResponseWriter, r *http.Request) {
	var n fleet.NewDevice
	if err := decodeJSON(r, &n); err != nil {
		h.fail(w, r, err)
		return
	}
	d, token, err := h.d.Register(r.Context(), n)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/api/v1/devices/"+d.ID)
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusCreated, registration{Device: d, Token: token})
}

type devicePage struct {
	Devices    []fleet.Device `json:"devices"`
	NextCursor string         `json:"next_cursor"`
}

func (h *deviceHandlers) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := fleet.Filter{Status: q.Get("status"), Model: q.Get("model"), Firmware: q.Get("firmware"),
		Tag: q.Get("tag"), State: q.Get("state"), Compat: q.Get("compat"), After: q.Get("cursor")}
	var err error
	if f.Protocol, err = fleet.ParseProtocol(q.Get("protocol")); err != nil {
		h.fail(w, r, BadRequest("protocol", err.Error()))
		return
	}
	if f.Limit, err = intParam(q.Get("limit"), "limit"); err != nil {
		h.fail(w, r, err)
		return
	}
	devices, next, err := h.d.List(r.Context(), f)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, devicePage{Devices: devices, NextCursor: next})
}

func (h *deviceHandlers) get(w http.ResponseWriter, r *http.Request) {
	d, err := h.d.Get(r.Context(), chi.URLParam(r, "id"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

func (h *deviceHandlers) patch(w http.ResponseWriter, r *http.Request) {
	var p fleet.Patch
	if err := decodeJSON(r, &p); err != nil {
		h.fail(w, r, err)
		return
	}
	d, err := h.d.Update(r.Context(), chi.URLParam(r, "id"), p)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// decommission revokes the credential and kicks the live session; the
// device's record and history stay, marked decommissioned.
func (h *deviceHandlers) decommission(w http.ResponseWriter, r *http.Request) {
	d, err := h.d.Decommission(r.Context(), chi.URLParam(r, "id"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

func (h *deviceHandlers) rotate(w http.ResponseWriter, r *http.Request) {
	token, err := h.d.RotateToken(r.Context(), chi.URLParam(r, "id"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, map[string]string{"token": token})
}

type eventPage struct {
	Events     []fleet.Event `json:"events"`
	NextCursor string        `json:"next_cursor"`
}

func (h *deviceHandlers) events(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit, err := intParam(q.Get("limit"), "limit")
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if limit == 0 {
		limit = 100
	}
	var before *fleet.EventCursor
	if c := q.Get("cursor"); c != "" {
		if before, err = decodeEventCursor(c); err != nil {
			h.fail(w, r, err)
			return
		}
	}
	events, err := h.d.Events(r.Context(), chi.URLParam(r, "id"), before, limit)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	next := ""
	if len(events) == limit {
		last := events[len(events)-1]
		next = encodeEventCursor(fleet.EventCursor{At: last.At, ID: last.ID})
	}
	writeJSON(w, http.StatusOK, eventPage{Events: events, NextCursor: next})
}

// Event cursors are opaque to clients: base64url("<unix ns>.<event id>").
func encodeEventCursor(c fleet.EventCursor) string {
	return base64.RawURLEncoding.EncodeToString([]byte(fmt.Sprintf("%d.%s", c.At.UnixNano(), c.ID)))
}

func decodeEventCursor(s string) (*fleet.EventCursor, error) {
	bad := BadRequest("cursor", "not a cursor returned by this endpoint")
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, bad
	}
	ns, id, ok := strings.Cut(string(raw), ".")
	if !ok {
		return nil, bad
	}
	n, err := strconv.ParseInt(ns, 10, 64)
	if err != nil {
		return nil, bad
	}
	c := &fleet.EventCursor{At: time.Unix(0, n)}
	if err := c.ID.UnmarshalText([]byte(id)); err != nil {
		return nil, bad
	}
	return c, nil
}

func intParam(v, name string) (int, error) {
	if v == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, BadRequest(name, name+" must be a whole number")
	}
	return n, nil
}
