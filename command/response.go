package command

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"unicode/utf8"
)

// Response is a device's answer on devices/{id}/cmd/response:
// {"id":"cmd_…","status":"succeeded"|"failed","result":…}. An MQTT 5 device
// may carry the id in the Correlation Data of its PUBLISH instead (the
// command's own, echoed), and omit it from the payload.
type Response struct {
	ID     string
	Status State
	Result json.RawMessage // compacted; nil when absent
}

// idPattern is the shape of the ids fleetd gives commands (newID).
var idPattern = regexp.MustCompile(`^cmd_[0-9a-f]{32}$`)

// ParseResponse reads and bounds a response. correlation is the MQTT 5
// Correlation Data (nil for MQTT 3). Everything in it is untrusted: an error
// says what is wrong in a sentence fit for a rejected event, quoting at most
// a short excerpt.
func ParseResponse(payload, correlation []byte, l Limits) (Response, error) {
	l = l.withDefaults()
	if len(payload) > l.MaxResponse {
		return Response{}, fmt.Errorf("response of %d bytes; at most %d", len(payload), l.MaxResponse)
	}
	if !utf8.Valid(payload) {
		return Response{}, fmt.Errorf("response is not UTF-8")
	}
	var wire struct {
		ID     *string         `json:"id"`
		Status *string         `json:"status"`
		Result json.RawMessage `json:"result"`
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	if err := dec.Decode(&wire); err != nil {
		return Response{}, fmt.Errorf("response is not a JSON object: %s", clip(err.Error(), 80))
	}
	if dec.More() {
		return Response{}, fmt.Errorf("response holds more than one JSON value")
	}
	var r Response
	if len(correlation) > 0 {
		if !idPattern.Match(correlation) {
			return Response{}, fmt.Errorf("correlation data is not a command id (%d bytes)", len(correlation))
		}
		r.ID = string(correlation)
	}
	if wire.ID != nil {
		switch {
		case !idPattern.MatchString(*wire.ID):
			return Response{}, fmt.Errorf("id %q is not a command id", clip(*wire.ID, 40))
		case r.ID != "" && r.ID != *wire.ID:
			return Response{}, fmt.Errorf("id %s differs from the correlation data %s", *wire.ID, r.ID)
		}
		r.ID = *wire.ID
	}
	if r.ID == "" {
		return Response{}, fmt.Errorf("response names no command: no id, no correlation data")
	}
	if wire.Status == nil {
		return r, fmt.Errorf("response to %s has no status", r.ID)
	}
	switch s := State(*wire.Status); s {
	case StateSucceeded, StateFailed:
		r.Status = s
	default:
		return r, fmt.Errorf("response to %s has status %q; want succeeded or failed", r.ID, clip(*wire.Status, 20))
	}
	if res := bytes.TrimSpace(wire.Result); len(res) > 0 && string(res) != "null" {
		var buf bytes.Buffer
		_ = json.Compact(&buf, res) // the decoder checked it
		if buf.Len() > l.MaxResult {
			return r, fmt.Errorf("result of %s is %d bytes; at most %d", r.ID, buf.Len(), l.MaxResult)
		}
		r.Result = buf.Bytes()
	}
	return r, nil
}

// Refusal is why a well-formed response settles nothing.
type Refusal string

// Refusals of Judge.
const (
	RefuseNone     Refusal = ""
	RefuseUnknown  Refusal = "unknown"
	RefuseOther    Refusal = "other_device"
	RefuseFinished Refusal = "finished"
)

// Judge decides whether a response from deviceID settles the command found
// under its id (found false: none). It is pure so that every case has a
// table row: a command of another device, one already finished, and an
// unknown id settle nothing.
func Judge(found bool, c Command, deviceID string) Refusal {
	switch {
	case !found:
		return RefuseUnknown
	case c.DeviceID != deviceID:
		return RefuseOther
	case c.State.Final():
		return RefuseFinished
	}
	return RefuseNone
}

// Explain says in a sentence why a response was refused.
func (r Refusal) Explain(id string, c Command) string {
	switch r {
	case RefuseUnknown:
		return "response to unknown command " + id
	case RefuseOther:
		return "response to command " + id + " of another device"
	case RefuseFinished:
		return "response to command " + id + ", already " + string(c.State)
	}
	return ""
}
