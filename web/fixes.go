package web

import (
	"context"
	"net/http"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/fix"
)

// Fixer is what the fix endpoint needs (fix.Service). Apply returns a
// *fleet.ValidationError naming the field of a request it refuses.
type Fixer interface {
	Apply(ctx context.Context, r fix.Request) (fix.Result, error)
}

// MountFixes adds POST /fixes: the configuration change a problem's
// diagnosis names, applied to the devices given or selected whose diagnosis
// names the problem now; one outcome per device.
func (s *Server) MountFixes(f Fixer) {
	fail := func(w http.ResponseWriter, r *http.Request, err error) { writeError(w, r, s.opts.Logger, err) }
	s.mount(func(_, api chi.Router) {
		api.Post("/fixes", func(w http.ResponseWriter, r *http.Request) {
			var req fix.Request
			if err := decodeJSON(r, &req); err != nil {
				fail(w, r, err)
				return
			}
			res, err := f.Apply(r.Context(), req)
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, res)
		})
	})
}
