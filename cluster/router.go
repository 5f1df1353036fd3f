package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Local is this replica's broker, as the router needs it.
type Local interface {
	// Send publishes to devices/{id}/{sub} on this replica.
	Send(deviceID, sub string, payload []byte) error
	// SendRequest publishes like Send, with devices/{id}/{responseSub} as
	// the MQTT 5 Response Topic and correlation as the Correlation Data.
	SendRequest(deviceID, sub string, payload []byte, responseSub string, correlation []byte) error
	// Listening reports whether the device has a live session here
	// subscribed to a filter that matches devices/{id}/{sub}.
	Listening(deviceID, sub string) bool
	// Connected reports whether the device has a live session here.
	Connected(deviceID string) bool
}

// Router sends messages to devices wherever they are connected: through
// this replica's broker when the session is here, else through the bus to
// every replica, where the one holding the session publishes it. It is the
// Sender the campaigns use.
type Router struct {
	local Local
	bus   *Bus
	pool  *pgxpool.Pool
	log   *slog.Logger
}

const kindSend = "send"

// deviceMessage is a message for a device, on its way to its replica.
type deviceMessage struct {
	DeviceID string `json:"d"`
	Sub      string `json:"s"`
	Payload  []byte `json:"p"`
	// A request (SendRequest): where the answer goes, and its correlation.
	ResponseSub string `json:"r,omitempty"`
	Correlation []byte `json:"c,omitempty"`
}

// NewRouter builds the router and registers its handler on the bus.
func NewRouter(local Local, bus *Bus, pool *pgxpool.Pool, logger *slog.Logger) *Router {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	r := &Router{local: local, bus: bus, pool: pool, log: logger}
	bus.Handle(kindSend, r.receive)
	return r
}

// Send delivers to the device's session here, or hands the message to the
// replica that holds it. A message that does not fit in a signal (about 5
// KiB of payload) cannot cross replicas and is refused with ErrTooLarge.
func (r *Router) Send(deviceID, sub string, payload []byte) error {
	if r.local.Connected(deviceID) {
		return r.local.Send(deviceID, sub, payload)
	}
	return r.bus.Publish(context.Background(), kindSend, deviceMessage{DeviceID: deviceID, Sub: sub, Payload: payload})
}

// SendRequest is Send for a request that asks for an answer (command):
// the replica holding the session publishes it with its Response Topic and
// Correlation Data (broker.SendRequest).
func (r *Router) SendRequest(deviceID, sub string, payload []byte, responseSub string, correlation []byte) error {
	if r.local.Connected(deviceID) {
		return r.local.SendRequest(deviceID, sub, payload, responseSub, correlation)
	}
	return r.bus.Publish(context.Background(), kindSend, deviceMessage{DeviceID: deviceID, Sub: sub, Payload: payload,
		ResponseSub: responseSub, Correlation: correlation})
}

// Listening reports whether the device listens here, or is online on
// another replica (which publishes only if it is subscribed there; a device
// that subscribes later is redelivered to by that replica's own hooks).
func (r *Router) Listening(deviceID, sub string) bool {
	if r.local.Listening(deviceID, sub) {
		return true
	}
	var online bool
	err := r.pool.QueryRow(context.Background(), `SELECT online FROM devices WHERE id = $1`, deviceID).Scan(&online)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		r.log.Warn("cannot tell whether a device is online on another replica", "device_id", deviceID, "err", err)
	}
	return online
}

func (r *Router) receive(items []json.RawMessage) {
	for _, raw := range items {
		var m deviceMessage
		if err := json.Unmarshal(raw, &m); err != nil {
			r.log.Warn("ignored a malformed device message from another replica", "err", err)
			continue
		}
		if !r.local.Listening(m.DeviceID, m.Sub) {
			continue
		}
		send := r.local.Send
		if m.ResponseSub != "" {
			send = func(id, sub string, payload []byte) error {
				return r.local.SendRequest(id, sub, payload, m.ResponseSub, m.Correlation)
			}
		}
		if err := send(m.DeviceID, m.Sub, m.Payload); err != nil {
			r.log.Warn("cannot deliver a message from another replica", "device_id", m.DeviceID, "sub", m.Sub, "err", fmt.Sprint(err))
		}
	}
}
