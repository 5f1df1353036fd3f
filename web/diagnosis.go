package web

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/fleet"
)

// Analysis is what the diagnosis endpoints need from the registry.
type Analysis interface {
	Policy() fleet.Policy
	SetPolicy(ctx context.Context, p fleet.Policy) (fleet.Policy, error)
	Verdicts(ctx context.Context) ([]fleet.FirmwareVerdict, error)
	DecideVerdict(ctx context.Context, model, firmware, decision string) error
	Diagnose(ctx context.Context, id string) (fleet.Diagnosis, error)
	FleetHealth(ctx context.Context) (fleet.FleetHealth, error)
	FleetHistory(ctx context.Context, q fleet.HistoryQuery) (fleet.FleetHistory, error)
	FleetLinks(ctx context.Context, window time.Duration) (fleet.LinkStats, error)
}

// MountDiagnosis adds the endpoints that say why devices drop:
// /compat/rules, /compat/verdicts, /devices/{id}/diagnosis, /fleet/health,
// /fleet/history, /fleet/links.
func (s *Server) MountDiagnosis(a Analysis) {
	fail := func(w http.ResponseWriter, r *http.Request, err error) { writeError(w, r, s.opts.Logger, err) }
	s.mount(func(_, api chi.Router) { mountDiagnosis(api, a, fail) })
}

func mountDiagnosis(api chi.Router, a Analysis, fail func(http.ResponseWriter, *http.Request, error)) {
	api.Get("/compat/rules", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Policy())
	})
	api.Put("/compat/rules", func(w http.ResponseWriter, r *http.Request) {
		var p fleet.Policy
		if err := decodeJSON(r, &p); err != nil {
			fail(w, r, err)
			return
		}
		saved, err := a.SetPolicy(r.Context(), p)
		if err != nil {
			fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, saved)
	})
	api.Get("/compat/verdicts", func(w http.ResponseWriter, r *http.Request) {
		v, err := a.Verdicts(r.Context())
		if err != nil {
			fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"verdicts": v})
	})
	// An operator confirms a learned verdict (flagged whatever the evidence),
	// overrides it (never flagged) or clears the decision ("").
	api.Put("/compat/verdicts", func(w http.ResponseWriter, r *http.Request) {
		var d struct {
			Model    string `json:"model"`
			Firmware string `json:"firmware"`
			Decision string `json:"decision"`
		}
		if err := decodeJSON(r, &d); err != nil {
			fail(w, r, err)
			return
		}
		if err := a.DecideVerdict(r.Context(), d.Model, d.Firmware, d.Decision); err != nil {
			fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, d)
	})
	api.Get("/devices/{id}/diagnosis", func(w http.ResponseWriter, r *http.Request) {
		d, err := a.Diagnose(r.Context(), chi.URLParam(r, "id"))
		if err != nil {
			fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, d)
	})
	api.Get("/fleet/health", func(w http.ResponseWriter, r *http.Request) {
		h, err := a.FleetHealth(r.Context())
		if err != nil {
			fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, h)
	})
	// Connects, disconnects and refusals per bucket, from the rollups:
	// ?from=&to= (RFC 3339) and step=1m|5m|1h|1d.
	api.Get("/fleet/history", func(w http.ResponseWriter, r *http.Request) {
		q := fleet.HistoryQuery{Step: r.URL.Query().Get("step")}
		for _, t := range []struct {
			name string
			into *time.Time
		}{{"from", &q.From}, {"to", &q.To}} {
			v := r.URL.Query().Get(t.name)
			if v == "" {
				continue
			}
			at, err := time.Parse(time.RFC3339, v)
			if err != nil {
				fail(w, r, BadRequest(t.name, t.name+" must be an RFC 3339 time such as 2025-01-02T15:04:05Z"))
				return
			}
			*t.into = at
		}
		h, err := a.FleetHistory(r.Context(), q)
		if err != nil {
			fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, h)
	})
	// Lost sessions per device-hour by channel and access point over
	// ?window= seconds (default the policy's link window, at most 90 days).
	api.Get("/fleet/links", func(w http.ResponseWriter, r *http.Request) {
		var window time.Duration
		if v := r.URL.Query().Get("window"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 60 || n > 90*86400 {
				fail(w, r, BadRequest("window", "window must be a number of seconds between 60 and 7776000 (90 days)"))
				return
			}
			window = time.Duration(n) * time.Second
		}
		st, err := a.FleetLinks(r.Context(), window)
		if err != nil {
			fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
}
