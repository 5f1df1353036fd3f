package command

import (
	"context"
	"encoding/json"
	"time"
)

// Message is the payload of devices/{id}/cmd/{name}. The id is in it for
// every device (MQTT 3 devices have nothing else to answer with); MQTT 5
// devices also get it as the Correlation Data, with the Response Topic.
type Message struct {
	ID     string          `json:"id"`
	Name   string          `json:"name"`
	Params json.RawMessage `json:"params"`
	// ExpiresAt is when the command stops being sent; a device may ignore a
	// command it receives later than that (its clock permitting).
	ExpiresAt time.Time `json:"expires_at"`
}

// responseSub is where devices answer, under devices/{id}/.
const responseSub = "cmd/" + ResponseTopic

// deliver sends a command to a device that listens on its command topic
// and records the delivery; a device that does not gets it when it
// subscribes (DeviceListening). It returns the command as it now is.
func (s *Service) deliver(ctx context.Context, c Command) Command {
	sub := "cmd/" + c.Name
	if !s.send.Listening(c.DeviceID, sub) {
		return c
	}
	payload, _ := json.Marshal(Message{ID: c.ID, Name: c.Name, Params: c.Params, ExpiresAt: c.ExpiresAt})
	if err := s.send.SendRequest(c.DeviceID, sub, payload, responseSub, []byte(c.ID)); err != nil {
		s.log.Warn("command not sent; it is sent when the device subscribes again", "device_id", c.DeviceID, "command_id", c.ID, "err", err)
		return c
	}
	if c.State != StateQueued {
		return c // a redelivery: its deadline runs from the first
	}
	d, ok, err := s.store.MarkDelivered(ctx, c.ID, s.opts.Now())
	switch {
	case err != nil:
		s.log.Warn("cannot record a command's delivery", "device_id", c.DeviceID, "command_id", c.ID, "err", err)
		return c
	case !ok:
		// Answered (or expired) meanwhile: the caller reads its state again.
		if cur, err := s.store.Get(ctx, c.DeviceID, c.ID); err == nil {
			return cur
		}
		return c
	}
	s.changed(d)
	return d
}

// DeviceListening notes that a device subscribed to its command topics:
// the commands waiting for it are sent now. It never blocks the caller (a
// broker hook).
func (s *Service) DeviceListening(deviceID string) { s.notes.Add(deviceID) }

// redeliverNoted sends every device noted since the last round its
// deliverable commands: queued ones, and delivered ones not answered yet
// (handing a message to a session is not receiving it; devices ignore a
// command id they already have).
func (s *Service) redeliverNoted(ctx context.Context) {
	for _, id := range s.notes.Take() {
		if ctx.Err() != nil {
			return
		}
		cs, err := s.store.Deliverable(ctx, id, s.opts.Now())
		if err != nil {
			s.log.Warn("cannot look up a device's pending commands", "device_id", id, "err", err)
			continue
		}
		for _, c := range cs {
			s.deliver(ctx, c)
		}
	}
}
