package broker

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/fleetd/fleetd/internal/untrusted"
)

// Everything a device sends is untrusted: the checks in this file run at the
// edge, before a string from a device is recorded, kept in memory or logged.

// maxLabelLen bounds the firmware and model strings a device announces (birth
// message, MQTT 5 user properties): they are stored with every event.
const maxLabelLen = 64

// maxExcerpt bounds how much of a device's bytes a log line or an event
// detail may carry.
const maxExcerpt = 64

// checkLabel reports why a firmware or model string cannot be kept: too long,
// not UTF-8, or holding control characters (a NUL byte would make
// PostgreSQL refuse the whole row).
func checkLabel(field, s string) error {
	switch {
	case len(s) > maxLabelLen:
		return fmt.Errorf("%s is %d bytes long; at most %d are kept", field, len(s), maxLabelLen)
	case !utf8.ValidString(s):
		return fmt.Errorf("%s %s is not valid UTF-8", field, excerpt(s))
	case strings.IndexFunc(s, unicode.IsControl) >= 0:
		return fmt.Errorf("%s %s holds a control character", field, excerpt(s))
	}
	return nil
}

// excerpt renders a bounded, escaped excerpt of device bytes for a log line
// or an event detail.
func excerpt[T string | []byte](s T) string { return untrusted.Excerpt(s, maxExcerpt) }

// birth is the payload of devices/{id}/status.
type birth struct {
	Online   *bool  `json:"online"`
	Firmware string `json:"firmware"`
	Model    string `json:"model"`
}

// errNotBirth marks a status message that is not a birth: the device going
// away ({"online":false}, usually its will).
var errNotBirth = errors.New("not a birth")

// parseBirth decodes and checks a status message. It returns errNotBirth for
// {"online":false}, and an error that says what is wrong for anything that
// cannot be taken as a birth.
func parseBirth(payload []byte) (birth, error) {
	var msg birth
	if err := json.Unmarshal(payload, &msg); err != nil {
		return msg, fmt.Errorf("status is not a JSON object: %v", err)
	}
	if msg.Online == nil {
		return msg, errors.New(`status has no "online" field`)
	}
	if !*msg.Online {
		return msg, errNotBirth
	}
	if err := checkLabel("firmware", msg.Firmware); err != nil {
		return msg, err
	}
	if err := checkLabel("model", msg.Model); err != nil {
		return msg, err
	}
	return msg, nil
}
