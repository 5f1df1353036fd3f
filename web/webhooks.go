package web

import (
	"context"
	"net/http"
	"strconv"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/notify"
)

// Webhooks is what the webhook endpoints need (notify.Store). Create and
// Update return a *notify.ValidationError naming the field that is wrong;
// calls on one subscription return errors wrapping notify.ErrNotFound.
type Webhooks interface {
	Create(ctx context.Context, spec notify.Spec, actor string) (notify.Subscription, error)
	List(ctx context.Context) ([]notify.Subscription, error)
	Get(ctx context.Context, id string) (notify.Subscription, error)
	Update(ctx context.Context, id string, p notify.Patch) (notify.Subscription, error)
	Delete(ctx context.Context, id string) error
	Test(ctx context.Context, id, actor string) (notify.Delivery, error)
	Deliveries(ctx context.Context, id string, limit int, before int64) ([]notify.Delivery, error)
}

func init() {
	RegisterError(notify.ErrNotFound, http.StatusNotFound, "not_found")
	RegisterError(notify.ErrTooMany, http.StatusConflict, "too_many_webhooks")
}

// MountWebhooks adds the webhook endpoints: GET /webhooks/events (the
// notification types), POST /webhooks (201, with the secret shown this
// once), GET /webhooks, GET, PATCH and DELETE /webhooks/{id},
// POST /webhooks/{id}/test and GET /webhooks/{id}/deliveries (the delivery
// log, newest first, ?limit= and ?before= a delivery id).
func (s *Server) MountWebhooks(h Webhooks) {
	fail := func(w http.ResponseWriter, r *http.Request, err error) { writeError(w, r, s.opts.Logger, err) }
	s.mount(func(_, api chi.Router) {
		api.Get("/webhooks/events", func(w http.ResponseWriter, r *http.Request) {
			writeJSON(w, http.StatusOK, map[string]any{"events": notify.Types})
		})
		api.Post("/webhooks", func(w http.ResponseWriter, r *http.Request) {
			var spec notify.Spec
			if err := decodeJSON(r, &spec); err != nil {
				fail(w, r, err)
				return
			}
			sub, err := h.Create(r.Context(), spec, actor(r))
			if err != nil {
				fail(w, r, err)
				return
			}
			w.Header().Set("Location", "/api/v1/webhooks/"+sub.ID)
			writeJSON(w, http.StatusCreated, sub)
		})
		api.Get("/webhooks", func(w http.ResponseWriter, r *http.Request) {
			subs, err := h.List(r.Context())
			if err != nil {
				fail(w, r, err)
				return
			}
			if subs == nil {
				subs = []notify.Subscription{}
			}
			writeJSON(w, http.StatusOK, map[string]any{"webhooks": subs})
		})
		api.Get("/webhooks/{id}", func(w http.ResponseWriter, r *http.Request) {
			sub, err := h.Get(r.Context(), chi.URLParam(r, "id"))
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, sub)
		})
		api.Patch("/webhooks/{id}", func(w http.ResponseWriter, r *http.Request) {
			var p notify.Patch
			if err := decodeJSON(r, &p); err != nil {
				fail(w, r, err)
				return
			}
			sub, err := h.Update(r.Context(), chi.URLParam(r, "id"), p)
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, sub)
		})
		api.Delete("/webhooks/{id}", func(w http.ResponseWriter, r *http.Request) {
			if err := h.Delete(r.Context(), chi.URLParam(r, "id")); err != nil {
				fail(w, r, err)
				return
			}
			w.WriteHeader(http.StatusNoContent)
		})
		api.Post("/webhooks/{id}/test", func(w http.ResponseWriter, r *http.Request) {
			d, err := h.Test(r.Context(), chi.URLParam(r, "id"), actor(r))
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusAccepted, d)
		})
		api.Get("/webhooks/{id}/deliveries", func(w http.ResponseWriter, r *http.Request) {
			q := r.URL.Query()
			limit, err := intParam(q.Get("limit"), "limit")
			if err == nil && (limit < 0 || limit > 200) {
				err = BadRequest("limit", "limit must be between 1 and 200")
			}
			var before int64
			if v := q.Get("before"); err == nil && v != "" {
				if before, err = strconv.ParseInt(v, 10, 64); err != nil || before <= 0 {
					err = BadRequest("before", "before must be a delivery id")
				}
			}
			if err != nil {
				fail(w, r, err)
				return
			}
			ds, err := h.Deliveries(r.Context(), chi.URLParam(r, "id"), limit, before)
			if err != nil {
				fail(w, r, err)
				return
			}
			if ds == nil {
				ds = []notify.Delivery{}
			}
			writeJSON(w, http.StatusOK, map[string]any{"deliveries": ds})
		})
	})
}
