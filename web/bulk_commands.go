package web

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/command"
)

// BulkCommands is what the bulk command endpoints need (command.Bulks).
// Create returns a *command.ValidationError naming the field that is wrong
// and errors wrapping command.ErrTooManyBulks; Get, Devices and Cancel
// return errors wrapping command.ErrNotFound, Cancel also
// command.ErrFinished.
type BulkCommands interface {
	Create(ctx context.Context, r command.BulkRequest) (command.Bulk, error)
	Get(ctx context.Context, id string) (command.Bulk, error)
	List(ctx context.Context, after *command.Cursor, limit int) ([]command.Bulk, *command.Cursor, error)
	Devices(ctx context.Context, id, state string, after, limit int) ([]command.BulkTarget, int, error)
	Cancel(ctx context.Context, id string) (command.Bulk, error)
}

func init() {
	RegisterError(command.ErrTooManyBulks, http.StatusTooManyRequests, "too_many_bulks")
	RegisterError(command.ErrFinished, http.StatusConflict, "finished")
}

// MountBulkCommands adds the bulk command endpoints: POST /commands
// (create, 201 with the bulk), GET /commands (newest first, paged),
// GET /commands/{id} (the summary), GET /commands/{id}/devices (per-device
// results, paged, ?state=) and POST /commands/{id}/cancel.
func (s *Server) MountBulkCommands(b BulkCommands) {
	fail := func(w http.ResponseWriter, r *http.Request, err error) { writeError(w, r, s.opts.Logger, err) }
	s.mount(func(_, api chi.Router) {
		api.Post("/commands", func(w http.ResponseWriter, r *http.Request) {
			var body struct {
				commandBody
				Selector command.Selector `json:"selector"`
				Pacing   command.Pacing   `json:"pacing"`
			}
			if err := decodeJSON(r, &body); err != nil {
				fail(w, r, err)
				return
			}
			one, err := body.request()
			if err != nil {
				fail(w, r, err)
				return
			}
			req := command.BulkRequest{Request: one, Selector: body.Selector, Pacing: body.Pacing}
			bulk, err := b.Create(r.Context(), req)
			if err != nil {
				fail(w, r, err)
				return
			}
			w.Header().Set("Location", "/api/v1/commands/"+bulk.ID)
			writeJSON(w, http.StatusCreated, bulk)
		})
		api.Get("/commands", func(w http.ResponseWriter, r *http.Request) {
			limit, err := commandLimit(r)
			var after *command.Cursor
			if cur := r.URL.Query().Get("cursor"); err == nil && cur != "" {
				after, err = decodeCommandCursor(cur)
			}
			if err != nil {
				fail(w, r, err)
				return
			}
			bs, next, err := b.List(r.Context(), after, limit)
			if err != nil {
				fail(w, r, err)
				return
			}
			page := struct {
				Bulks      []command.Bulk `json:"bulks"`
				NextCursor string         `json:"next_cursor"`
			}{Bulks: bs}
			if page.Bulks == nil {
				page.Bulks = []command.Bulk{}
			}
			if next != nil {
				page.NextCursor = encodeCommandCursor(*next)
			}
			writeJSON(w, http.StatusOK, page)
		})
		api.Get("/commands/{id}", func(w http.ResponseWriter, r *http.Request) {
			bulk, err := b.Get(r.Context(), chi.URLParam(r, "id"))
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, bulk)
		})
		api.Get("/commands/{id}/devices", func(w http.ResponseWriter, r *http.Request) {
			limit, err := commandLimit(r)
			after := -1
			if cur := r.URL.Query().Get("cursor"); err == nil && cur != "" {
				after, err = decodePositionCursor(cur)
			}
			if err != nil {
				fail(w, r, err)
				return
			}
			ts, next, err := b.Devices(r.Context(), chi.URLParam(r, "id"), r.URL.Query().Get("state"), after, limit)
			if err != nil {
				fail(w, r, err)
				return
			}
			page := struct {
				Devices    []command.BulkTarget `json:"devices"`
				NextCursor string               `json:"next_cursor"`
			}{Devices: ts}
			if page.Devices == nil {
				page.Devices = []command.BulkTarget{}
			}
			if next >= 0 {
				page.NextCursor = base64.RawURLEncoding.EncodeToString([]byte("p" + strconv.Itoa(next)))
			}
			writeJSON(w, http.StatusOK, page)
		})
		api.Post("/commands/{id}/cancel", func(w http.ResponseWriter, r *http.Request) {
			bulk, err := b.Cancel(r.Context(), chi.URLParam(r, "id"))
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, bulk)
		})
	})
}

// Position cursors are opaque to clients: base64url("p<position>").
func decodePositionCursor(s string) (int, error) {
	bad := BadRequest("cursor", "not a cursor returned by this endpoint")
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return 0, bad
	}
	n, err := strconv.Atoi(strings.TrimPrefix(string(raw), "p"))
	if err != nil || !strings.HasPrefix(string(raw), "p") || n < 0 {
		return 0, bad
	}
	return n, nil
}

// BulkCommandChanged publishes a bulk command's progress to the live
// streams (event "bulk_command"). It never blocks. Progress comes from
// every replica (the one whose devices answered, the one that completed
// the bulk), and the bus may bring another replica's "running" after this
// one's completion: a change of a bulk that already ended here is stale
// and is not published (a bulk never runs again once it ended).
func (h *Hub) BulkCommandChanged(c command.BulkChange) {
	if !h.bulkEnded.note(c.ID, c.State != command.BulkRunning) {
		return
	}
	if h.subscribers() == 0 {
		return
	}
	b, _ := json.Marshal(c)
	h.publish(streamEvent{"bulk_command", b})
}

// endedBulks remembers the most recent bulks that ended, a bounded set
// (the oldest is forgotten first): a stale change can only come within
// moments of a bulk's end.
type endedBulks struct {
	mu    sync.Mutex
	ids   map[string]bool
	order []string
}

const maxEndedBulks = 1024

// note records a change of bulk id and reports whether it is to be
// published: not when the bulk ended before and this change says it runs.
func (e *endedBulks) note(id string, ended bool) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ids == nil {
		e.ids = map[string]bool{}
	}
	if e.ids[id] {
		return ended
	}
	if ended {
		e.ids[id] = true
		e.order = append(e.order, id)
		if len(e.order) > maxEndedBulks {
			delete(e.ids, e.order[0])
			e.order = e.order[1:]
		}
	}
	return true
}
