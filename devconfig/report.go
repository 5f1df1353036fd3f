package devconfig

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"
)

// Message is the payload of devices/{id}/config/desired and of
// devices/{id}/config/reported: a version and a configuration document.
type Message struct {
	Version int64 `json:"version"`
	Config  Doc   `json:"config"`
}

// Payload encodes the desired message a device is sent.
func (m Message) Payload() []byte {
	return []byte(`{"version":` + strconv.FormatInt(m.Version, 10) + `,"config":` + string(Encode(m.Config)) + `}`)
}

// Reported is the latest configuration a device reported.
type Reported struct {
	Version int64     `json:"version"`
	Config  Doc       `json:"config"`
	At      time.Time `json:"at"`
}

// ParseReport reads and bounds a device's report on
// devices/{id}/config/reported: {"version":N,"config":{…}}, N a
// non-negative integer, the config an object within the limits. Everything
// in it is untrusted: an error says what is wrong in a sentence fit for a
// rejected event, quoting at most a short excerpt.
func ParseReport(payload []byte, l Limits) (Message, error) {
	l = l.withDefaults()
	if len(payload) > l.MaxReport {
		return Message{}, fmt.Errorf("configuration report of %d bytes; at most %d", len(payload), l.MaxReport)
	}
	if !utf8.Valid(payload) {
		return Message{}, fmt.Errorf("configuration report is not UTF-8")
	}
	var wire struct {
		Version json.RawMessage `json:"version"`
		Config  json.RawMessage `json:"config"`
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	if err := dec.Decode(&wire); err != nil {
		return Message{}, fmt.Errorf("configuration report is not a JSON object: %s", clip(err.Error(), 80))
	}
	if dec.More() {
		return Message{}, fmt.Errorf("configuration report holds more than one JSON value")
	}
	v := string(bytes.TrimSpace(wire.Version))
	if v == "" || v == "null" {
		return Message{}, fmt.Errorf("configuration report has no version")
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		return Message{}, fmt.Errorf("configuration report has version %s; want a non-negative integer", strconv.QuoteToASCII(clip(v, 24)))
	}
	if c := bytes.TrimSpace(wire.Config); len(c) == 0 || string(c) == "null" {
		return Message{}, fmt.Errorf("configuration report of version %d has no config", n)
	}
	doc, err := parse(wire.Config, "config", kindReport, l.MaxReport, l)
	if err != nil {
		return Message{}, fmt.Errorf("configuration report of version %d: %w", n, err)
	}
	return Message{Version: n, Config: doc}, nil
}
