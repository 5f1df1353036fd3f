// Package telemetry stores what devices publish on devices/{id}/telemetry:
// numeric metrics (RSSI, uptime…) and the link they are on (BSSID, SSID,
// band, channel). Messages are parsed and bounded at the edge (Parse),
// sampled per device (Ingest), queued and written in batches (Writer) into
// raw points partitioned by day and per-minute and per-hour rollups, which
// Retention keeps within their settings (Store holds the SQL).
package telemetry

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/fleetd/fleetd/internal/untrusted"
)

// Bounds on what one message may make fleetd keep. Everything a device sends
// is untrusted: a message is parsed here, before anything of it is queued,
// stored or logged.
const (
	// MaxPayload is the largest telemetry message parsed; a larger one is
	// refused whole, so that parsing costs a bounded time on the device's
	// connection goroutine whatever the broker's packet size.
	MaxPayload = 16 << 10
	// MaxMetrics is how many numeric fields one message may carry; the
	// first ones (in the message's order) are kept.
	MaxMetrics = 32
	// MaxNameLen bounds a metric name (see ValidMetric).
	MaxNameLen = 32
	// maxSSID is the longest SSID IEEE 802.11 allows, in bytes.
	maxSSID = 32
	// maxExcerpt bounds how much of a device's bytes a rejection carries,
	// and maxRefusals how many refused fields it names.
	maxExcerpt  = 40
	maxRefusals = 3
)

// Message is what fleetd keeps of one telemetry message.
type Message struct {
	Metrics []Metric
	// Link is the radio link the device reported; its zero fields were not
	// reported (or refused).
	Link Link
}

// Empty reports whether nothing of the message is kept.
func (m Message) Empty() bool { return len(m.Metrics) == 0 && m.Link == (Link{}) }

// Metric is one numeric field.
type Metric struct {
	Name  string
	Value float64
}

// Link is the WiFi link a device reported.
type Link struct {
	BSSID   string `json:"bssid,omitempty"`   // access point MAC, lower case aa:bb:cc:dd:ee:ff
	SSID    string `json:"ssid,omitempty"`    // network name, printable, at most 32 bytes
	Band    string `json:"band,omitempty"`    // "2.4", "5" or "6" (GHz)
	Channel int    `json:"channel,omitempty"` // 1 to 233
}

// ValidMetric reports whether name can be a metric name: a lower-case ASCII
// letter, then at most 31 lower-case letters, digits or underscores
// (^[a-z][a-z0-9_]{0,31}$). Names are columns of every rollup row and part of
// every query, so they are kept short and unambiguous.
func ValidMetric(name string) bool {
	if len(name) == 0 || len(name) > MaxNameLen || name[0] < 'a' || name[0] > 'z' {
		return false
	}
	for i := 1; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// errMalformed marks a message of which nothing is kept.
var errMalformed = errors.New("message not kept")

// Parse decodes a telemetry payload: a JSON object whose numeric fields with
// valid names (ValidMetric) are metrics, at most MaxMetrics of them, and
// whose bssid, ssid and band strings and channel number describe the link.
// Fields of any other name or type are ignored, and so is a repeated name
// (the last value counts). A value that is not a finite float64 (1e400) is
// not kept.
//
// The error says what was refused, for the device's rejected event. When it
// wraps errMalformed (not a JSON object, larger than MaxPayload, a syntax
// error anywhere, nesting deeper than encoding/json allows) nothing is kept;
// otherwise the message holds everything else: a known field with a bad value
// (a bssid that is not a MAC address) or metrics past MaxMetrics are left out.
func Parse(payload []byte) (Message, error) { return parse(payload, nil) }

// known is what a device's messages repeat, kept once per device (Ingest):
// the metric names it was admitted and its link's last BSSID and SSID. A
// message of known names and link parses into one allocation, its metrics,
// instead of one more for every name and link string; a device's
// telemetry is mostly the same few names again and again.
type known struct {
	names       []string // admitted metric names (Ingest.MaxNames)
	bssid, ssid string   // the last valid ones seen
}

// name returns the known name equal to key, or a copy of key.
func (k *known) name(key []byte) string {
	if k != nil {
		for _, n := range k.names {
			if n == string(key) {
				return n
			}
		}
	}
	return string(key)
}

// parse is Parse; with k, strings already known to k are shared rather than
// copied, and the link strings that are new are noted in k.
func parse(payload []byte, k *known) (Message, error) {
	var msg Message
	if len(payload) > MaxPayload {
		return msg, fmt.Errorf("%w: %d bytes; at most %d are read", errMalformed, len(payload), MaxPayload)
	}
	// json.Valid checks the whole message without allocating; the scanner
	// below relies on it and only finds the object's members.
	if !json.Valid(payload) {
		return msg, fmt.Errorf("%w: not JSON: %s", errMalformed, excerpt(payload))
	}
	sc := scanner{b: payload}
	sc.space()
	if sc.b[sc.i] != '{' {
		return msg, fmt.Errorf("%w: not a JSON object: %s", errMalformed, excerpt(payload))
	}
	sc.i++
	// The metrics are gathered on the stack and copied once, at their final
	// length, rather than grown on the heap one append at a time.
	var buf [MaxMetrics]Metric
	metrics, appended := buf[:0], false
	var refused []string
	extra, more := 0, 0
	refuse := func(err error) {
		if len(refused) == maxRefusals {
			more++
			return
		}
		refused = append(refused, err.Error())
	}
	for {
		key, raw, ok := sc.member()
		if !ok {
			break
		}
		switch string(key) {
		case "bssid", "ssid", "band":
			// The field's name as a constant: key itself would be copied
			// to the heap, since set may name it in an error.
			field := "bssid"
			if string(key) != field {
				field = "ssid"
				if string(key) != field {
					field = "band"
				}
			}
			if err := msg.Link.set(field, raw, k); err != nil {
				refuse(err)
			}
			continue
		case "channel":
			if err := msg.Link.set("channel", raw, k); err != nil {
				refuse(err)
				metrics = drop(metrics, "channel")
				continue // a channel that is not one is not a metric either
			}
		}
		if !ValidMetric(string(key)) {
			continue
		}
		v, isNumber := number(raw)
		i := index(metrics, string(key))
		switch {
		case i >= 0 && isNumber: // a repeated name: the last value counts
			metrics[i].Value = v
		case i >= 0:
			metrics = drop(metrics, string(key))
		case !isNumber:
		case len(metrics) == MaxMetrics:
			extra++
		default:
			metrics, appended = append(metrics, Metric{Name: k.name(key), Value: v}), true
		}
	}
	if appended {
		msg.Metrics = slices.Clone(metrics)
	}
	if more > 0 {
		refused = append(refused, fmt.Sprintf("%d more fields refused", more))
	}
	if extra > 0 {
		refused = append(refused, fmt.Sprintf("%d numeric fields past the first %d were left out", extra, MaxMetrics))
	}
	if len(refused) > 0 {
		return msg, errors.New("message partly kept: " + strings.Join(refused, "; "))
	}
	return msg, nil
}

// scanner walks the members of a JSON object that json.Valid accepted, so it
// checks nothing but finds where each key and value begin and end.
type scanner struct {
	b []byte
	i int
}

func (s *scanner) space() {
	for s.i < len(s.b) && (s.b[s.i] == ' ' || s.b[s.i] == '\t' || s.b[s.i] == '\n' || s.b[s.i] == '\r') {
		s.i++
	}
}

// member returns the next member's key (unescaped) and raw value, or false
// at the end of the object.
func (s *scanner) member() (key, raw []byte, ok bool) {
	s.space()
	if s.b[s.i] == ',' {
		s.i++
		s.space()
	}
	if s.b[s.i] == '}' {
		return nil, nil, false
	}
	start := s.i
	s.skip()
	key = unquote(s.b[start:s.i])
	s.space()
	s.i++ // ':'
	s.space()
	start = s.i
	s.skip()
	return key, s.b[start:s.i], true
}

// skip moves past one value: a string, an object or array (whatever its
// depth), or a number or literal.
func (s *scanner) skip() {
	depth := 0
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case '"':
			s.i++
			for s.b[s.i] != '"' {
				if s.b[s.i] == '\\' {
					s.i++
				}
				s.i++
			}
			s.i++
		case '{', '[':
			depth++
			s.i++
			continue
		case '}', ']':
			if depth == 0 {
				return
			}
			depth--
			s.i++
		case ',', ' ', '\t', '\n', '\r':
			if depth == 0 {
				return
			}
			s.i++
			continue
		default:
			s.i++
			continue
		}
		if depth == 0 {
			return
		}
	}
}

// unquote returns the content of a JSON string; escapes (rare in keys and
// link strings) are resolved by encoding/json.
func unquote(raw []byte) []byte {
	inner := raw[1 : len(raw)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return inner
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return nil
	}
	return []byte(s)
}

// drop removes a metric.
func drop(metrics []Metric, name string) []Metric {
	if i := index(metrics, name); i >= 0 {
		return append(metrics[:i], metrics[i+1:]...)
	}
	return metrics
}

func index(metrics []Metric, name string) int {
	for i := range metrics {
		if metrics[i].Name == name {
			return i
		}
	}
	return -1
}

// number returns a JSON number as a finite float64.
func number(raw []byte) (float64, bool) {
	if len(raw) == 0 || !(raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9') {
		return 0, false
	}
	// Most metrics are whole numbers (RSSI, uptime, counters): up to 15
	// digits they are exact in a float64, so they are read here, without
	// strconv. json.Valid has checked the syntax (no leading zeros).
	neg, digits := raw[0] == '-', raw
	if neg {
		digits = raw[1:]
	}
	if len(digits) <= 15 && allDigits(digits) {
		var u uint64
		for _, c := range digits {
			u = u*10 + uint64(c-'0')
		}
		v := float64(u)
		if neg {
			v = -v // -0 stays -0, as strconv reads it
		}
		return v, true
	}
	v, err := strconv.ParseFloat(string(raw), 64)
	if err != nil || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, false
	}
	return v, true
}

// allDigits reports whether b is one or more ASCII digits.
func allDigits(b []byte) bool {
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return len(b) > 0
}

// set checks and keeps one known link field; a null leaves it unreported.
// The strings equal to k's are k's (see known); new valid ones are noted in
// k.
func (l *Link) set(key string, raw []byte, k *known) error {
	if string(raw) == "null" {
		return nil
	}
	if key == "channel" {
		v, ok := number(raw)
		if !ok || v != math.Trunc(v) || v < 1 || v > 233 {
			return fmt.Errorf("channel %s is not a WiFi channel (a whole number from 1 to 233)", excerpt(raw))
		}
		l.Channel = int(v)
		return nil
	}
	if raw[0] != '"' {
		return fmt.Errorf("%s %s is not a string", key, excerpt(raw))
	}
	b := unquote(raw)
	switch key {
	case "bssid":
		var mac [17]byte
		if !parseMAC(b, &mac) {
			return fmt.Errorf("bssid %s is not a MAC address (aa:bb:cc:dd:ee:ff)", excerpt(b))
		}
		switch {
		case k == nil:
			l.BSSID = string(mac[:])
		case k.bssid == string(mac[:]):
			l.BSSID = k.bssid
		default:
			l.BSSID = string(mac[:])
			k.bssid = l.BSSID
		}
	case "ssid":
		if k != nil && k.ssid != "" && k.ssid == string(b) {
			l.SSID = k.ssid // checked when it was first seen
			return nil
		}
		s := string(b)
		if err := checkSSID(s); err != nil {
			return err
		}
		l.SSID = s
		if k != nil {
			k.ssid = s
		}
	case "band":
		switch string(b) {
		case "2.4":
			l.Band = "2.4"
		case "5":
			l.Band = "5"
		case "6":
			l.Band = "6"
		default:
			return fmt.Errorf("band %s is not 2.4, 5 or 6", excerpt(b))
		}
	}
	return nil
}

// parseMAC accepts six hexadecimal pairs separated by colons and writes them
// to mac in lower case.
func parseMAC(s []byte, mac *[17]byte) bool {
	if len(s) != 17 {
		return false
	}
	for i, c := range s {
		if i%3 == 2 {
			if c != ':' {
				return false
			}
		} else if c >= 'A' && c <= 'F' {
			c += 'a' - 'A'
		} else if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
		mac[i] = c
	}
	return true
}

// checkSSID refuses an SSID that cannot be shown and stored as it is:
// empty, longer than 802.11 allows, not UTF-8, or not printable (a control
// character, a NUL byte PostgreSQL would refuse).
func checkSSID(s string) error {
	switch {
	case s == "":
		return errors.New("ssid is empty")
	case len(s) > maxSSID:
		return fmt.Errorf("ssid is %d bytes long; at most %d are kept", len(s), maxSSID)
	case !utf8.ValidString(s):
		return fmt.Errorf("ssid %s is not valid UTF-8", excerpt(s))
	case strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0:
		return fmt.Errorf("ssid %s holds a character that is not printable", excerpt(s))
	}
	return nil
}

func excerpt[T string | []byte](s T) string { return untrusted.Excerpt(s, maxExcerpt) }

// orDefault sets *p to def when it holds the zero value (an option left
// unset).
func orDefault[T comparable](p *T, def T) {
	var zero T
	if *p == zero {
		*p = def
	}
}
