// Package fleet is the device registry: devices and their credentials,
// presence, connection events and why sessions end. It owns its PostgreSQL
// tables and imports neither the broker nor the web layer.
package fleet

import (
	"errors"
	"fmt"
	"regexp"
	"time"
)

// Sentinel errors; the web layer maps them to HTTP statuses in one table.
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("conflict")
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

// Device states.
const (
	StateActive         = "active"
	StateDecommissioned = "decommissioned"
)

// Device is one registered device with its last known presence.
type Device struct {
	ID                 string     `json:"id"`
	Model              string     `json:"model"`
	Tags               []string   `json:"tags"`
	State              string     `json:"state"`
	Firmware           string     `json:"firmware"`
	ProtocolVersion    Protocol   `json:"protocol_version"`
	Online             bool       `json:"online"`
	SessionEpoch       int64      `json:"session_epoch"`
	ConnectedAt        *time.Time `json:"connected_at"`
	DisconnectedAt     *time.Time `json:"disconnected_at"`
	LastSeen           *time.Time `json:"last_seen"`
	LastDisconnect     Reason     `json:"last_disconnect"`
	KeepaliveRequested int        `json:"keepalive_requested"`
	KeepaliveEffective int        `json:"keepalive_effective"`
	RemoteAddr         string     `json:"remote_addr"`
	TLSVersion         string     `json:"tls_version"`
	Listener           string     `json:"listener"`
	BrokerNode         string     `json:"broker_node"`
	CreatedAt          time.Time  `json:"created_at"`
	UpdatedAt          time.Time  `json:"updated_at"`
	DecommissionedAt   *time.Time `json:"decommissioned_at,omitempty"`
	// Incompatible is set by the analysis: the firmware breaks a rule or is
	// flagged (Incompatibilities says how).
	Incompatible      bool              `json:"incompatible"`
	Incompatibilities []Incompatibility `json:"incompatibilities"`
}

// idPattern keeps device ids safe as MQTT client ids and as one topic level:
// no '/', '+', '#', no leading '$', nothing a shell or URL would mangle.
var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]*$`)

const (
	maxIDLen    = 128
	maxModelLen = 64
	maxTagLen   = 64
	maxTags     = 32
)

// ValidateID reports why id cannot be a device id, naming field "id".
func ValidateID(id string) error {
	switch {
	case id == "":
		return invalid("id", "is required")
	case len(id) > maxIDLen:
		return invalid("id", "is longer than %d characters", maxIDLen)
	case !idPattern.MatchString(id):
		return invalid("id", "may hold only letters, digits, '.', '_', ':' and '-', and must start with a letter or digit")
	}
	return nil
}

// NewDevice is a registration request.
type NewDevice struct {
	ID    string   `json:"id"`
	Model string   `json:"model"`
	Tags  []string `json:"tags"`
}

// Validate checks a registration request.
func (n NewDevice) Validate() error {
	if err := ValidateID(n.ID); err != nil {
		return err
	}
	if err := validateModel(n.Model); err != nil {
		return err
	}
	return validateTags(n.Tags)
}

// Patch changes a device's operator-owned fields; nil means unchanged.
type Patch struct {
	Model *string   `json:"model"`
	Tags  *[]string `json:"tags"`
}

// Validate checks a patch.
func (p Patch) Validate() error {
	if p.Model == nil && p.Tags == nil {
		return invalid("body", "names no field to change (model, tags)")
	}
	if p.Model != nil {
		if err := validateModel(*p.Model); err != nil {
			return err
		}
	}
	if p.Tags != nil {
		return validateTags(*p.Tags)
	}
	return nil
}

func validateModel(m string) error {
	if len(m) > maxModelLen {
		return invalid("model", "is longer than %d characters", maxModelLen)
	}
	if m != "" && !idPattern.MatchString(m) {
		return invalid("model", "may hold only letters, digits, '.', '_', ':' and '-'")
	}
	return nil
}

func validateTags(tags []string) error {
	if len(tags) > maxTags {
		return invalid("tags", "holds more than %d tags", maxTags)
	}
	seen := map[string]bool{}
	for i, t := range tags {
		field := fmt.Sprintf("tags[%d]", i)
		switch {
		case t == "":
			return invalid(field, "is empty")
		case len(t) > maxTagLen:
			return invalid(field, "is longer than %d characters", maxTagLen)
		case !idPattern.MatchString(t) && !tagPattern.MatchString(t):
			return invalid(field, "may hold only letters, digits, '.', '_', ':', '=' and '-' (and '/', '+' after the '=')")
		case seen[t]:
			return invalid(field, "repeats %q", t)
		}
		seen[t] = true
	}
	return nil
}

// tagPattern allows key=value tags such as site=lyon. A value may also hold
// '/' and '+', for time zones (tz=Europe/Paris, tz=Etc/GMT+1): tags are never
// part of a topic.
var tagPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]*=[A-Za-z0-9._:/+-]+$`)

// Protocol is an MQTT protocol level as sent in CONNECT: 3 (MQTT 3.1),
// 4 (3.1.1) or 5. It renders as the version operators know: "3.1", "3.1.1", "5".
type Protocol int

// String returns the protocol's version name, or "" when unknown.
func (p Protocol) String() string {
	switch p {
	case 3:
		return "3.1"
	case 4:
		return "3.1.1"
	case 5:
		return "5"
	}
	return ""
}

// MarshalText renders the version name.
func (p Protocol) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText accepts a version name ("3.1", "3.1.1", "5", "5.0") or a level.
func (p *Protocol) UnmarshalText(b []byte) error {
	v, err := ParseProtocol(string(b))
	*p = v
	return err
}

// ParseProtocol reads a protocol version as an operator would write it.
func ParseProtocol(s string) (Protocol, error) {
	switch s {
	case "":
		return 0, nil
	case "3.1", "3":
		return 3, nil
	case "3.1.1", "4":
		return 4, nil
	case "5", "5.0":
		return 5, nil
	}
	return 0, fmt.Errorf("unknown MQTT protocol version %q (want 3.1, 3.1.1 or 5)", s)
}

// Filter selects devices for List. Zero values select everything.
type Filter struct {
	Status   string // "online", "offline" or ""
	Model    string
	Firmware string
	Protocol Protocol
	Tag      string
	// State is "active" (default), "decommissioned" or "all".
	State string
	// Compat is "incompatible", "compatible" or "".
	Compat string
	// After is the cursor: list ids greater than it.
	After string
	Limit int
}

// Validate checks a filter and fills in defaults.
func (f *Filter) Validate() error {
	switch f.Status {
	case "", "online", "offline":
	default:
		return invalid("status", "must be online or offline, not %q", f.Status)
	}
	switch f.State {
	case "":
		f.State = StateActive
	case StateActive, StateDecommissioned, "all":
	default:
		return invalid("state", "must be active, decommissioned or all, not %q", f.State)
	}
	switch f.Compat {
	case "", "incompatible", "compatible":
	default:
		return invalid("compat", "must be incompatible or compatible, not %q", f.Compat)
	}
	switch {
	case f.Limit == 0:
		f.Limit = 100
	case f.Limit < 0 || f.Limit > 1000:
		return invalid("limit", "must be between 1 and 1000")
	}
	return nil
}
