package web

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"io"
	"mime"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/firmware"
)

func init() {
	RegisterError(firmware.ErrNotFound, http.StatusNotFound, "not_found")
	RegisterError(firmware.ErrConflict, http.StatusConflict, "conflict")
	// An image recorded before images lived in the database, whose file is
	// on a replica that has not started since: it may come back.
	RegisterError(firmware.ErrUnavailable, http.StatusServiceUnavailable, "image_unavailable")
	// Bytes that do not match the artifact's digest are never served.
	RegisterError(firmware.ErrCorrupt, http.StatusInternalServerError, "image_corrupt")
}

// Artifacts is what the firmware endpoints need.
type Artifacts interface {
	Create(ctx context.Context, n firmware.NewArtifact, body io.Reader) (firmware.Artifact, error)
	Get(ctx context.Context, id string) (firmware.Artifact, error)
	List(ctx context.Context) ([]firmware.Artifact, error)
	Delete(ctx context.Context, id string) error
	Open(ctx context.Context, id string) (firmware.Artifact, *os.File, error)
	CheckURL(artifactID, deviceID, jobID, expires, sig string, now time.Time) error
	PublicKey() ed25519.PublicKey
}

// Campaigns is what the campaign endpoints need.
type Campaigns interface {
	Create(ctx context.Context, spec firmware.Spec, actor string) (firmware.CampaignView, error)
	Get(ctx context.Context, id string) (firmware.CampaignView, error)
	List(ctx context.Context) ([]firmware.CampaignView, error)
	History(ctx context.Context, id string) ([]firmware.HistoryEntry, error)
	Devices(ctx context.Context, id string) ([]firmware.CampaignDevice, error)
	Act(ctx context.Context, id, action, actor string) (firmware.CampaignView, error)
}

// FirmwareOptions tune the download endpoint. A download whose client
// stops reading loses its slot after Limits.StallTimeout (see stallWrites).
type FirmwareOptions struct {
	// MaxDownloads caps concurrent downloads; the excess gets 503 with
	// Retry-After, so a campaign cannot starve the API.
	MaxDownloads int
	// MaxDownloadsPerSource caps concurrent downloads per source address
	// (IPv4 address, IPv6 /64); the excess gets 429 with Retry-After, so a
	// few clients cannot take every slot. 0 is no cap.
	MaxDownloadsPerSource int
	// MaxUpload caps an image's size in bytes.
	MaxUpload int64
}

// MountFirmware adds /firmware and /campaigns.
func (s *Server) MountFirmware(a Artifacts, c Campaigns, o FirmwareOptions) {
	if o.MaxDownloads <= 0 {
		o.MaxDownloads = 100
	}
	if o.MaxUpload <= 0 {
		o.MaxUpload = 512 << 20
	}
	h := &firmwareHandlers{a: a, c: c, o: o, s: s, slots: make(chan struct{}, o.MaxDownloads),
		sources: &downloadSources{max: o.MaxDownloadsPerSource, n: map[netip.Prefix]int{}}}
	s.mount(func(public, api chi.Router) {
		public.Get("/firmware/{id}/download", h.download)
		public.Head("/firmware/{id}/download", h.download) // size and ETag before a ranged download
		api.Post("/firmware", h.upload)
		api.Get("/firmware", h.list)
		api.Get("/firmware/signing-key", h.signingKey)
		api.Get("/firmware/{id}", h.get)
		api.Delete("/firmware/{id}", h.delete)
		api.Post("/campaigns", h.createCampaign)
		api.Get("/campaigns", h.listCampaigns)
		api.Get("/campaigns/{id}", h.getCampaign)
		api.Get("/campaigns/{id}/history", h.history)
		api.Get("/campaigns/{id}/devices", h.campaignDevices)
		api.Post("/campaigns/{id}/{action:start|pause|resume|abort|rollback}", h.act)
	})
}

type firmwareHandlers struct {
	a       Artifacts
	c       Campaigns
	o       FirmwareOptions
	s       *Server
	slots   chan struct{}
	sources *downloadSources
}

func (h *firmwareHandlers) fail(w http.ResponseWriter, r *http.Request, err error) {
	writeError(w, r, h.s.opts.Logger, err)
}

// upload takes an image either as multipart/form-data (fields version,
// models, notes, signature before the file part "file") or as a raw body
// with the same fields as query parameters. The image is streamed to a
// temporary file, then into the database (never whole in memory).
// An image may be large and slow to arrive: instead of the server's
// ReadTimeout, each read of the body has Limits.ReadTimeout to bring data.
func (h *firmwareHandlers) upload(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, newUploadBody(w, r.Body, h.s.opts.Limits.ReadTimeout), h.o.MaxUpload)
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	var n firmware.NewArtifact
	splitModels := func(v string) []string {
		var out []string
		for _, m := range strings.Split(v, ",") {
			if m = strings.TrimSpace(m); m != "" {
				out = append(out, m)
			}
		}
		return out
	}
	if ct != "multipart/form-data" {
		q := r.URL.Query()
		n = firmware.NewArtifact{Version: q.Get("version"), Models: splitModels(q.Get("models")), Notes: q.Get("notes"), Signature: q.Get("signature")}
		h.create(w, r, n, r.Body)
		return
	}
	mr, err := r.MultipartReader()
	if err != nil {
		h.fail(w, r, BadRequest("body", "malformed multipart body: "+err.Error()))
		return
	}
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			h.fail(w, r, BadRequest("file", "no file part"))
			return
		}
		if err != nil {
			h.fail(w, r, BadRequest("body", "malformed multipart body: "+err.Error()))
			return
		}
		if part.FormName() == "file" {
			h.create(w, r, n, part)
			return
		}
		v, err := io.ReadAll(io.LimitReader(part, 64<<10))
		if err != nil {
			h.fail(w, r, BadRequest(part.FormName(), "unreadable"))
			return
		}
		switch part.FormName() {
		case "version":
			n.Version = string(v)
		case "models":
			n.Models = append(n.Models, splitModels(string(v))...)
		case "notes":
			n.Notes = string(v)
		case "signature":
			n.Signature = strings.TrimSpace(string(v))
		default:
			h.fail(w, r, BadRequest(part.FormName(), "unknown field "+part.FormName()))
			return
		}
	}
}

func (h *firmwareHandlers) create(w http.ResponseWriter, r *http.Request, n firmware.NewArtifact, body io.Reader) {
	art, err := h.a.Create(r.Context(), n, body)
	var maxErr *http.MaxBytesError
	if errors.As(err, &maxErr) {
		h.fail(w, r, BadRequest("file", "larger than the upload limit"))
		return
	}
	if err != nil {
		h.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/api/v1/firmware/"+art.ID)
	writeJSON(w, http.StatusCreated, art)
}

func (h *firmwareHandlers) list(w http.ResponseWriter, r *http.Request) {
	arts, err := h.a.List(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"firmware": arts})
}

func (h *firmwareHandlers) get(w http.ResponseWriter, r *http.Request) {
	art, err := h.a.Get(r.Context(), chi.URLParam(r, "id"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, art)
}

func (h *firmwareHandlers) delete(w http.ResponseWriter, r *http.Request) {
	if err := h.a.Delete(r.Context(), chi.URLParam(r, "id")); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *firmwareHandlers) signingKey(w http.ResponseWriter, r *http.Request) {
	k := h.a.PublicKey()
	writeJSON(w, http.StatusOK, map[string]string{"public_key": base64.StdEncoding.EncodeToString(k), "fingerprint": firmware.Fingerprint(k)})
}

// download serves an image with Range/If-Range and an ETag, to a device
// holding a signed URL or to the admin, from this replica's cache of the
// images in the database (Open fills it on the first download, within the
// download's slot). An image that is nowhere is 503, one whose bytes do not
// match its digest 500, both naming the artifact. Concurrent downloads are
// capped per source (429) and in all (503); a client that stops reading is
// cut off by the stall deadline (stallWrites), which frees its slot.
func (h *firmwareHandlers) download(w http.ResponseWriter, r *http.Request) {
	id := chi.URLParam(r, "id")
	q := r.URL.Query()
	authorised := false
	if q.Get("sig") != "" {
		if err := h.a.CheckURL(id, q.Get("device"), q.Get("job"), q.Get("expires"), q.Get("sig"), time.Now()); err != nil {
			writeJSON(w, http.StatusForbidden, errorBody{apiError{Code: "forbidden", Message: "download URL: " + err.Error(), Field: "sig"}})
			return
		}
		authorised = true
	}
	if !authorised {
		if _, ok := h.s.authenticate(w, r); !ok {
			return // authenticate answered 401 or 429
		}
	}
	src := sourceOf(r.RemoteAddr)
	if !h.sources.take(src) {
		writeTooMany(w, 5*time.Second, "too many concurrent firmware downloads from this address; retry later")
		return
	}
	defer h.sources.release(src)
	select {
	case h.slots <- struct{}{}:
		defer func() { <-h.slots }()
	default:
		w.Header().Set("Retry-After", "5")
		writeJSON(w, http.StatusServiceUnavailable, errorBody{apiError{Code: "busy", Message: "too many concurrent firmware downloads; retry later"}})
		return
	}
	art, f, err := h.a.Open(r.Context(), id)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	defer f.Close()
	w.Header().Set("ETag", `"`+art.SHA256+`"`)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("X-Firmware-Version", art.Version)
	http.ServeContent(w, r, art.Version+".bin", art.CreatedAt, f)
}

func (h *firmwareHandlers) createCampaign(w http.ResponseWriter, r *http.Request) {
	var spec firmware.Spec
	if err := decodeJSON(r, &spec); err != nil {
		h.fail(w, r, err)
		return
	}
	v, err := h.c.Create(r.Context(), spec, actor(r))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/api/v1/campaigns/"+v.ID)
	writeJSON(w, http.StatusCreated, v)
}

func (h *firmwareHandlers) listCampaigns(w http.ResponseWriter, r *http.Request) {
	vs, err := h.c.List(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"campaigns": vs})
}

func (h *firmwareHandlers) getCampaign(w http.ResponseWriter, r *http.Request) {
	v, err := h.c.Get(r.Context(), chi.URLParam(r, "id"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (h *firmwareHandlers) history(w http.ResponseWriter, r *http.Request) {
	hs, err := h.c.History(r.Context(), chi.URLParam(r, "id"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"history": hs})
}

func (h *firmwareHandlers) act(w http.ResponseWriter, r *http.Request) {
	v, err := h.c.Act(r.Context(), chi.URLParam(r, "id"), chi.URLParam(r, "action"), actor(r))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (h *firmwareHandlers) campaignDevices(w http.ResponseWriter, r *http.Request) {
	ds, err := h.c.Devices(r.Context(), chi.URLParam(r, "id"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"devices": ds})
}
