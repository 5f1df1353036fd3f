package web

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/fleet"
)

// Hub fans live changes out to the console's streams: presence changes as
// they are recorded, campaign progress as it changes. A subscriber that
// cannot keep up misses updates rather than slowing the broker down.
type Hub struct {
	mu     sync.Mutex
	subs   map[chan streamEvent]struct{}
	closed bool
	// Campaigns changed since WatchCampaigns last published them.
	dirty map[string]struct{}
	wake  chan struct{}
	// Open streams, in all and per bearer token, for the caps of subscribe.
	open        int
	openByToken map[string]int
	// bulkEnded drops stale progress of bulks that ended (BulkCommandChanged).
	bulkEnded endedBulks
}

type streamEvent struct {
	name string
	data []byte
}

// NewHub returns an empty hub.
func NewHub() *Hub {
	return &Hub{subs: map[chan streamEvent]struct{}{}, dirty: map[string]struct{}{}, wake: make(chan struct{}, 1)}
}

// presence is the payload of a presence event.
type presence struct {
	DeviceID string         `json:"device_id"`
	Kind     fleet.Kind     `json:"kind"`
	Online   bool           `json:"online"`
	Reason   fleet.Reason   `json:"reason,omitempty"`
	Firmware string         `json:"firmware,omitempty"`
	Protocol fleet.Protocol `json:"protocol_version,omitempty"`
	At       time.Time      `json:"at"`
}

// Observe takes every recorded event; connects and disconnects become
// presence events. It never blocks.
func (h *Hub) Observe(e fleet.Event) {
	if e.Kind != fleet.KindConnect && e.Kind != fleet.KindDisconnect {
		return
	}
	h.mu.Lock()
	n := len(h.subs)
	h.mu.Unlock()
	if n == 0 {
		return
	}
	// A session taken over leaves the device online, on its new session.
	online := e.Kind == fleet.KindConnect || e.Reason == fleet.ReasonSessionTakeover
	b, _ := json.Marshal(presence{DeviceID: e.DeviceID, Kind: e.Kind, Online: online, Reason: e.Reason,
		Firmware: e.Firmware, Protocol: e.ProtocolVersion, At: e.At})
	h.publish(streamEvent{"presence", b})
}

func (h *Hub) publish(ev streamEvent) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for ch := range h.subs {
		select {
		case ch <- ev:
		default: // a slow subscriber misses this one
		}
	}
}

// subscribe opens a stream for a bearer token (credential). It reports
// false, opening nothing, when maxTotal streams are open already, or
// maxPerToken for this token (0: no cap). The stream counts until its done
// func is called, even after Close.
func (h *Hub) subscribe(token string, maxPerToken, maxTotal int) (chan streamEvent, func(), bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if maxTotal > 0 && h.open >= maxTotal || maxPerToken > 0 && h.openByToken[token] >= maxPerToken {
		return nil, nil, false
	}
	if h.openByToken == nil {
		h.openByToken = map[string]int{}
	}
	h.open++
	h.openByToken[token]++
	ch := make(chan streamEvent, 256)
	if h.closed {
		close(ch)
	} else {
		h.subs[ch] = struct{}{}
	}
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			if _, ok := h.subs[ch]; ok {
				delete(h.subs, ch)
				close(ch)
			}
			h.open--
			if h.openByToken[token]--; h.openByToken[token] <= 0 {
				delete(h.openByToken, token)
			}
		})
	}, true
}

func (h *Hub) subscribers() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs)
}

// Close ends every stream, so that a graceful shutdown does not wait for
// consoles that stay open.
func (h *Hub) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for ch := range h.subs {
		delete(h.subs, ch)
		close(ch)
	}
}

// CampaignChanged is told, by the code that changed it, that a campaign's
// view changed (firmware.Campaigns.OnChange). It never blocks: changes are
// coalesced per campaign until WatchCampaigns publishes them.
func (h *Hub) CampaignChanged(id string) {
	h.mu.Lock()
	h.dirty[id] = struct{}{}
	h.mu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// campaignPublishInterval bounds how often one campaign is published: a
// wave of device reports becomes one event per interval, not one per report.
const campaignPublishInterval = 250 * time.Millisecond

// WatchCampaigns publishes a campaign event for every campaign changed
// (CampaignChanged), at most once per interval each, until ctx ends. It reads
// only the campaigns that changed, and nothing while nobody watches.
func (h *Hub) WatchCampaigns(ctx context.Context, c Campaigns) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.wake:
		}
		h.mu.Lock()
		dirty := h.dirty
		h.dirty = map[string]struct{}{}
		h.mu.Unlock()
		if h.subscribers() > 0 {
			for id := range dirty {
				v, err := c.Get(ctx, id)
				if err != nil {
					continue // deleted, or the database is away: the next change publishes it
				}
				b, _ := json.Marshal(v)
				h.publish(streamEvent{"campaign", b})
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(campaignPublishInterval):
		}
	}
}

// streamRetryAfter is what a refused stream is told to wait: streams end
// when consoles close, which nothing predicts.
const streamRetryAfter = 10 * time.Second

// MountStream adds GET /api/v1/stream: Server-Sent Events of presence and
// campaign changes. It needs the bearer token like the rest of the API, so
// browsers read it with fetch rather than EventSource. Open streams are
// capped per token and in all (Limits.MaxStreamsPerToken, MaxStreams); past
// a cap a new stream gets 429 with Retry-After.
func (s *Server) MountStream(h *Hub) {
	s.mount(func(_, api chi.Router) {
		api.Get("/stream", func(w http.ResponseWriter, r *http.Request) {
			flusher, ok := w.(http.Flusher)
			if !ok {
				writeJSON(w, http.StatusInternalServerError, errorBody{apiError{Code: "internal", Message: "streaming unsupported"}})
				return
			}
			ch, done, ok := h.subscribe(credential(r.Context()), s.opts.Limits.MaxStreamsPerToken, s.opts.Limits.MaxStreams)
			if !ok {
				writeTooMany(w, streamRetryAfter, "too many live streams open; close one or retry later")
				return
			}
			defer done()
			w.Header().Set("Content-Type", "text/event-stream")
			w.Header().Set("Cache-Control", "no-cache")
			w.Header().Set("X-Accel-Buffering", "no")
			fmt.Fprint(w, ": fleetd live stream\n\n")
			flusher.Flush()
			ping := time.NewTicker(15 * time.Second)
			defer ping.Stop()
			for {
				select {
				case <-r.Context().Done():
					return
				case ev, ok := <-ch:
					if !ok {
						return
					}
					fmt.Fprintf(w, "event: %s\ndata: %s\n\n", ev.name, ev.data)
					flusher.Flush()
				case <-ping.C:
					fmt.Fprint(w, ": ping\n\n")
					flusher.Flush()
				}
			}
		})
	})
}
