package web

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/command"
)

// Commands is what the command endpoints need (command.Service). Create
// returns a *command.ValidationError naming the field that is wrong, and
// errors wrapping fleet.ErrNotFound (no such device), command.ErrGone and
// command.ErrTooMany; Get and Wait return errors wrapping
// command.ErrNotFound.
type Commands interface {
	Create(ctx context.Context, deviceID string, r command.Request) (command.Command, error)
	Get(ctx context.Context, deviceID, id string) (command.Command, error)
	Wait(ctx context.Context, deviceID, id string, wait time.Duration) (command.Command, error)
	List(ctx context.Context, deviceID string, after *command.Cursor, limit int) ([]command.Command, *command.Cursor, error)
}

func init() {
	RegisterError(command.ErrNotFound, http.StatusNotFound, "not_found")
	RegisterError(command.ErrGone, http.StatusConflict, "decommissioned")
	RegisterError(command.ErrTooMany, http.StatusTooManyRequests, "too_many_pending")
}

// maxWaitParam bounds ?wait= before the service bounds it by the command.
const maxWaitParam = 60

// MountCommands adds the single-device command endpoints:
// POST /devices/{id}/commands (send), GET /devices/{id}/commands (recent,
// newest first) and GET /devices/{id}/commands/{cid} (?wait=SECONDS waits
// for the answer).
func (s *Server) MountCommands(c Commands) {
	fail := func(w http.ResponseWriter, r *http.Request, err error) { writeError(w, r, s.opts.Logger, err) }
	s.mount(func(_, api chi.Router) {
		api.Post("/devices/{id}/commands", func(w http.ResponseWriter, r *http.Request) {
			var body commandBody
			if err := decodeJSON(r, &body); err != nil {
				fail(w, r, err)
				return
			}
			req, err := body.request()
			if err != nil {
				fail(w, r, err)
				return
			}
			cmd, err := c.Create(r.Context(), chi.URLParam(r, "id"), req)
			if err != nil {
				fail(w, r, err)
				return
			}
			w.Header().Set("Location", "/api/v1/devices/"+cmd.DeviceID+"/commands/"+cmd.ID)
			writeJSON(w, http.StatusCreated, cmd)
		})
		api.Get("/devices/{id}/commands", func(w http.ResponseWriter, r *http.Request) {
			q := r.URL.Query()
			limit, err := commandLimit(r)
			if err != nil {
				fail(w, r, err)
				return
			}
			var after *command.Cursor
			if cur := q.Get("cursor"); cur != "" {
				if after, err = decodeCommandCursor(cur); err != nil {
					fail(w, r, err)
					return
				}
			}
			cs, next, err := c.List(r.Context(), chi.URLParam(r, "id"), after, limit)
			if err != nil {
				fail(w, r, err)
				return
			}
			if cs == nil {
				cs = []command.Command{}
			}
			page := struct {
				Commands   []command.Command `json:"commands"`
				NextCursor string            `json:"next_cursor"`
			}{Commands: cs}
			if next != nil {
				page.NextCursor = encodeCommandCursor(*next)
			}
			writeJSON(w, http.StatusOK, page)
		})
		api.Get("/devices/{id}/commands/{cid}", func(w http.ResponseWriter, r *http.Request) {
			wait, err := intParam(r.URL.Query().Get("wait"), "wait")
			if err == nil && (wait < 0 || wait > maxWaitParam) {
				err = BadRequest("wait", fmt.Sprintf("wait must be from 0 to %d seconds", maxWaitParam))
			}
			if err != nil {
				fail(w, r, err)
				return
			}
			var cmd command.Command
			if wait > 0 {
				cmd, err = c.Wait(r.Context(), chi.URLParam(r, "id"), chi.URLParam(r, "cid"), time.Duration(wait)*time.Second)
			} else {
				cmd, err = c.Get(r.Context(), chi.URLParam(r, "id"), chi.URLParam(r, "cid"))
			}
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, cmd)
		})
	})
}

// commandBody is a command as POSTed, to one device or in a bulk: the
// durations are read here so that a bad one is a 400 naming its field.
type commandBody struct {
	Name      string          `json:"name"`
	Params    json.RawMessage `json:"params"`
	Timeout   json.RawMessage `json:"timeout"`
	ExpiresIn json.RawMessage `json:"expires_in"`
}

func (b commandBody) request() (command.Request, error) {
	req := command.Request{Name: b.Name, Params: b.Params}
	for _, d := range []struct {
		field string
		raw   json.RawMessage
		into  *command.Duration
	}{{"timeout", b.Timeout, &req.Timeout}, {"expires_in", b.ExpiresIn, &req.ExpiresIn}} {
		if len(d.raw) == 0 || string(d.raw) == "null" {
			continue
		}
		if err := d.into.UnmarshalJSON(d.raw); err != nil {
			return req, BadRequest(d.field, d.field+": "+err.Error())
		}
	}
	return req, nil
}

// commandLimit reads ?limit= of a command listing.
func commandLimit(r *http.Request) (int, error) {
	limit, err := intParam(r.URL.Query().Get("limit"), "limit")
	if err == nil && (limit < 0 || limit > command.MaxList) {
		err = BadRequest("limit", fmt.Sprintf("limit must be from 1 to %d", command.MaxList))
	}
	return limit, err
}

// Command cursors are opaque to clients: base64url("<unix µs>.<command id>").
func encodeCommandCursor(c command.Cursor) string {
	return base64.RawURLEncoding.EncodeToString([]byte(fmt.Sprintf("%d.%s", c.At.UnixMicro(), c.ID)))
}

func decodeCommandCursor(s string) (*command.Cursor, error) {
	bad := BadRequest("cursor", "not a cursor returned by this endpoint")
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, bad
	}
	us, id, ok := strings.Cut(string(raw), ".")
	n, err := strconv.ParseInt(us, 10, 64)
	if !ok || err != nil || len(id) > 64 {
		return nil, bad
	}
	return &command.Cursor{At: time.UnixMicro(n), ID: id}, nil
}

// CommandChanged publishes a command's new state to the live streams (event
// "command"). It never blocks.
func (h *Hub) CommandChanged(c command.Change) {
	if h.subscribers() == 0 {
		return
	}
	b, _ := json.Marshal(c)
	h.publish(streamEvent{"command", b})
}
