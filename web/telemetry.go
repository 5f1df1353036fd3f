package web

import (
	"context"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/telemetry"
)

// Telemetry is what the telemetry endpoints need from the telemetry store.
// Both return a *fleet.ValidationError naming the query parameter that
// is wrong; Series returns an error wrapping fleet.ErrNotFound for an unknown
// device.
type Telemetry interface {
	Series(ctx context.Context, q telemetry.SeriesQuery) (telemetry.Series, error)
	Summary(ctx context.Context, q telemetry.SummaryQuery) (telemetry.Summary, error)
}

// MountTelemetry adds GET /devices/{id}/telemetry (one metric of a device
// over time, raw or rolled up) and GET /fleet/telemetry (the latest value of
// a metric per device, aggregated by firmware, model, channel or access point).
func (s *Server) MountTelemetry(t Telemetry) {
	fail := func(w http.ResponseWriter, r *http.Request, err error) { writeError(w, r, s.opts.Logger, err) }
	s.mount(func(_, api chi.Router) {
		api.Get("/devices/{id}/telemetry", func(w http.ResponseWriter, r *http.Request) {
			q := r.URL.Query()
			sq := telemetry.SeriesQuery{DeviceID: chi.URLParam(r, "id"), Metric: q.Get("metric"), Step: q.Get("step")}
			var err error
			if sq.From, err = timeParam(q.Get("from"), "from"); err != nil {
				fail(w, r, err)
				return
			}
			if sq.To, err = timeParam(q.Get("to"), "to"); err != nil {
				fail(w, r, err)
				return
			}
			series, err := t.Series(r.Context(), sq)
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, series)
		})
		api.Get("/fleet/telemetry", func(w http.ResponseWriter, r *http.Request) {
			q := r.URL.Query()
			sum, err := t.Summary(r.Context(), telemetry.SummaryQuery{Metric: q.Get("metric"), GroupBy: q.Get("group_by")})
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, sum)
		})
	})
}

// timeParam parses an optional RFC 3339 query parameter.
func timeParam(v, name string) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		return time.Time{}, BadRequest(name, name+" must be an RFC 3339 time such as 2025-01-31T15:04:05Z")
	}
	return t, nil
}
