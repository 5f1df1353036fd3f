// Package command sends commands to single devices and records their
// answers: an operator's request is validated and stored, published to
// devices/{id}/cmd/{name} (QoS 1) through the replica holding the device's
// session, sent again when the device subscribes after a reconnect, and
// settled by the device's response on devices/{id}/cmd/response, by its
// timeout or by its expiry.
//
// The work is split by job: the command and its rules (command.go), the
// device's response and how it settles a command (response.go), storage
// (store.go), delivery and redelivery (deliver.go), the sweep of timeouts,
// expiry and retention (sweep.go), waiting for an answer (wait.go), and the
// service that ties them (service.go).
//
// Bulk commands send one command to the devices a selector matches, paced:
// the bulk, its selector and pacing rules (bulk.go, Decide is pure), their
// storage and counters (bulk_store.go) and the pacer (bulks.go). Each
// device's command is an ordinary command of the service.
package command

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"time"
)

// State is where a command is in its life.
type State string

// Command states. Queued and delivered are pending; the others are final.
const (
	StateQueued    State = "queued"    // stored, not yet handed to a session that listens
	StateDelivered State = "delivered" // published to the device's session; no answer yet
	StateSucceeded State = "succeeded" // the device answered succeeded
	StateFailed    State = "failed"    // the device answered failed
	StateTimedOut  State = "timed_out" // delivered, and no answer within its timeout
	StateExpired   State = "expired"   // still queued when it expired
)

// Final reports whether a state is an outcome: nothing changes it any more.
func (s State) Final() bool {
	return s == StateSucceeded || s == StateFailed || s == StateTimedOut || s == StateExpired
}

// pendingStates are the states a response or the sweep can settle.
var pendingStates = []string{string(StateQueued), string(StateDelivered)}

// Command is one command to one device.
type Command struct {
	ID          string          `json:"id"`
	DeviceID    string          `json:"device_id"`
	Name        string          `json:"name"`
	Params      json.RawMessage `json:"params"`
	State       State           `json:"state"`
	Result      json.RawMessage `json:"result,omitempty"`
	Timeout     Duration        `json:"timeout"`
	CreatedAt   time.Time       `json:"created_at"`
	ExpiresAt   time.Time       `json:"expires_at"`
	DeliveredAt *time.Time      `json:"delivered_at"`
	FinishedAt  *time.Time      `json:"finished_at"`
	UpdatedAt   time.Time       `json:"updated_at"`
	// BulkID names the bulk command this command is part of, if any.
	BulkID string `json:"bulk_id,omitempty"`
}

// Request is what an operator asks for (POST /devices/{id}/commands).
type Request struct {
	Name   string          `json:"name"`
	Params json.RawMessage `json:"params,omitempty"`
	// Timeout is how long the device has to answer once the command is
	// delivered; ExpiresIn how long it may wait for the device to listen.
	Timeout   Duration `json:"timeout,omitempty"`
	ExpiresIn Duration `json:"expires_in,omitempty"`
}

// Limits bound what a client can make fleetd send and keep.
type Limits struct {
	// MaxParams is the largest params object, in bytes once compacted. It
	// must fit a message between replicas (about 5 KiB).
	MaxParams int
	// DefaultTimeout, MinTimeout and MaxTimeout bound Request.Timeout.
	DefaultTimeout, MinTimeout, MaxTimeout time.Duration
	// DefaultExpiresIn, MinExpiresIn and MaxExpiresIn bound Request.ExpiresIn.
	DefaultExpiresIn, MinExpiresIn, MaxExpiresIn time.Duration
	// MaxPending is how many commands a device may have queued or delivered
	// at once; one more is refused (ErrTooMany).
	MaxPending int
	// MaxResult is the largest result kept from a response, in bytes.
	MaxResult int
	// MaxResponse is the largest response payload read, in bytes.
	MaxResponse int
}

// DefaultLimits are the limits used where a field is zero.
var DefaultLimits = Limits{
	MaxParams:      4 << 10,
	DefaultTimeout: 30 * time.Second, MinTimeout: time.Second, MaxTimeout: 15 * time.Minute,
	DefaultExpiresIn: 10 * time.Minute, MinExpiresIn: time.Second, MaxExpiresIn: 24 * time.Hour,
	MaxPending: 16, MaxResult: 16 << 10, MaxResponse: 32 << 10,
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	for _, f := range []struct{ v, def *int }{{&l.MaxParams, &d.MaxParams}, {&l.MaxPending, &d.MaxPending},
		{&l.MaxResult, &d.MaxResult}, {&l.MaxResponse, &d.MaxResponse}} {
		if *f.v == 0 {
			*f.v = *f.def
		}
	}
	for _, f := range []struct{ v, def *time.Duration }{{&l.DefaultTimeout, &d.DefaultTimeout}, {&l.MinTimeout, &d.MinTimeout},
		{&l.MaxTimeout, &d.MaxTimeout}, {&l.DefaultExpiresIn, &d.DefaultExpiresIn}, {&l.MinExpiresIn, &d.MinExpiresIn},
		{&l.MaxExpiresIn, &d.MaxExpiresIn}} {
		if *f.v == 0 {
			*f.v = *f.def
		}
	}
	return l
}

// Sentinels. web maps them to statuses.
var (
	// ErrNotFound: no such command for this device (or no such device).
	ErrNotFound = errors.New("not found")
	// ErrTooMany: the device has as many pending commands as it may.
	ErrTooMany = errors.New("too many pending commands")
	// ErrGone: the device is decommissioned.
	ErrGone = errors.New("device decommissioned")
)

// ValidationError names the request field that is wrong.
type ValidationError struct {
	Field string
	Msg   string
}

func (e *ValidationError) Error() string     { return e.Field + ": " + e.Msg }
func (e *ValidationError) FieldName() string { return e.Field }

func invalid(field, format string, a ...any) error {
	return &ValidationError{Field: field, Msg: fmt.Sprintf(format, a...)}
}

// namePattern keeps a command name one safe topic level, short enough to
// log and index.
var namePattern = regexp.MustCompile(`^[a-z][a-z0-9_]{0,31}$`)

// ResponseTopic is the topic level, under devices/{id}/cmd/, that devices
// answer on; no command may have its name.
const ResponseTopic = "response"

// Normalize checks a request against the limits and fills in the defaults:
// the params object compacted ({} when absent), the timeout and expiry. It
// returns a *ValidationError naming the first field that is wrong.
func (r Request) Normalize(l Limits) (Request, error) {
	l = l.withDefaults()
	switch {
	case r.Name == "":
		return r, invalid("name", "is required")
	case !namePattern.MatchString(r.Name):
		return r, invalid("name", "%s is not a command name: a lower-case letter, then up to 31 lower-case letters, digits or _", strconv.QuoteToASCII(clip(r.Name, 40)))
	case r.Name == ResponseTopic:
		return r, invalid("name", "%q is reserved: devices answer on devices/{id}/cmd/response", ResponseTopic)
	}
	params := bytes.TrimSpace(r.Params)
	if len(params) == 0 || string(params) == "null" {
		params = []byte("{}")
	}
	if params[0] != '{' {
		return r, invalid("params", "must be a JSON object")
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, params); err != nil {
		return r, invalid("params", "is not valid JSON: %v", err)
	}
	if buf.Len() > l.MaxParams {
		return r, invalid("params", "is %d bytes; at most %d", buf.Len(), l.MaxParams)
	}
	r.Params = buf.Bytes()
	var err error
	if r.Timeout, err = bounded("timeout", r.Timeout, l.DefaultTimeout, l.MinTimeout, l.MaxTimeout); err != nil {
		return r, err
	}
	if r.ExpiresIn, err = bounded("expires_in", r.ExpiresIn, l.DefaultExpiresIn, l.MinExpiresIn, l.MaxExpiresIn); err != nil {
		return r, err
	}
	return r, nil
}

func bounded(field string, d Duration, def, lo, hi time.Duration) (Duration, error) {
	if d == 0 {
		return Duration(def), nil
	}
	if d.D() < lo || d.D() > hi {
		return d, invalid(field, "%s is out of range: from %s to %s", d, lo, hi)
	}
	return d, nil
}

// clip shortens s to at most n bytes, for messages about untrusted input.
func clip(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// Duration is a time.Duration that reads and writes JSON as a string ("30s")
// and also accepts a number of seconds (30, 1.5), as the campaign API does.
type Duration time.Duration

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// String formats the duration as time.Duration does ("1m30s").
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON writes the duration as a string such as "1m30s".
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON accepts a duration string or a number of seconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("%q is not a duration (e.g. 30s, 2m)", clip(s, 40))
		}
		*d = Duration(v)
		return nil
	}
	n, err := strconv.ParseFloat(string(bytes.TrimSpace(b)), 64)
	if err != nil || math.IsNaN(n) || math.IsInf(n, 0) || math.Abs(n) > 1e9 {
		return fmt.Errorf("%s is not a duration (e.g. \"30s\" or a number of seconds)", clip(string(b), 40))
	}
	*d = Duration(n * float64(time.Second))
	return nil
}
