// Package devconfig keeps each device's desired configuration and the
// configuration it reports. Operators write layers — fleet defaults, a
// model, a tag, a model at a tag — and a device's own layer; they resolve,
// in that order, into the device's effective desired document, which is
// versioned per device and published retained on
// devices/{id}/config/desired. The device answers on
// devices/{id}/config/reported with the version it applied.
//
// The work is split by job: documents, their bounds, RFC 7396 merge patch
// and differences (document.go), layer scopes and resolution (layer.go),
// the device's report (report.go), storage and set-based re-resolution
// (store.go), and the service that publishes and takes reports
// (service.go, handler.go).
package devconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"sort"
	"strings"
	"unicode/utf8"

	jsonpatch "github.com/evanphx/json-patch/v5"
)

// Doc is a configuration document: a JSON object decoded with json.Number
// for numbers, so that 25 stays 25 and large integers keep their digits.
type Doc = map[string]any

// Limits bound what an operator or a device can make fleetd keep and send.
type Limits struct {
	// MaxDocument is the largest layer (fleet, model, tag or a device's
	// own), in bytes once compacted.
	MaxDocument int
	// MaxEffective is the largest effective document a device is sent; a
	// device whose layers merge into more keeps its previous one, and its
	// configuration says why (Problem).
	MaxEffective int
	// MaxReport is the largest report payload a device may send, in bytes.
	MaxReport int
	// MaxDepth is how deeply objects and arrays may nest (the document
	// itself is depth 1).
	MaxDepth int
	// MaxKeys is how many object members a document may hold, at every
	// depth together.
	MaxKeys int
	// MaxKeyLen is the longest member name, in bytes.
	MaxKeyLen int
}

// DefaultLimits are used where a field is zero.
var DefaultLimits = Limits{MaxDocument: 16 << 10, MaxEffective: 64 << 10, MaxReport: 32 << 10,
	MaxDepth: 8, MaxKeys: 512, MaxKeyLen: 128}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	for _, f := range []struct{ v, def *int }{{&l.MaxDocument, &d.MaxDocument}, {&l.MaxEffective, &d.MaxEffective},
		{&l.MaxReport, &d.MaxReport}, {&l.MaxDepth, &d.MaxDepth}, {&l.MaxKeys, &d.MaxKeys}, {&l.MaxKeyLen, &d.MaxKeyLen}} {
		if *f.v <= 0 {
			*f.v = *f.def
		}
	}
	return l
}

// Sentinels. web maps them to statuses.
var (
	// ErrNotFound: no such layer.
	ErrNotFound = errors.New("not found")
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

// docKind says what a parsed document is for: a stored layer may hold no
// null (null means "remove" only in a merge patch), a patch may.
type docKind int

const (
	kindLayer  docKind = iota // PUT: a whole layer
	kindPatch                 // PATCH: an RFC 7396 merge patch
	kindReport                // a device's reported configuration
)

// parse reads one JSON object and checks it against the limits: at most
// max bytes once compacted, UTF-8, nested at most MaxDepth deep, at most
// MaxKeys members with names of at most MaxKeyLen bytes, and no null
// unless it is a patch. Errors name field and say what is wrong in a
// sentence fit for an API error or a rejected event.
func parse(raw []byte, field string, kind docKind, max int, l Limits) (Doc, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return nil, invalid(field, "is empty; want a JSON object")
	}
	if !utf8.Valid(raw) {
		return nil, invalid(field, "is not UTF-8")
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		return nil, invalid(field, "is not valid JSON: %s", clip(err.Error(), 80))
	}
	if buf.Len() > max {
		return nil, invalid(field, "is %d bytes; at most %d", buf.Len(), max)
	}
	if buf.Bytes()[0] != '{' {
		return nil, invalid(field, "must be a JSON object")
	}
	dec := json.NewDecoder(&buf)
	dec.UseNumber()
	var d Doc
	if err := dec.Decode(&d); err != nil {
		return nil, invalid(field, "is not a JSON object: %s", clip(err.Error(), 80))
	}
	keys := 0
	if err := check(d, "", 1, kind, l, &keys); err != nil {
		return nil, invalid(field, "%s", err.Error())
	}
	return d, nil
}

func check(v any, path string, depth int, kind docKind, l Limits, keys *int) error {
	if depth > l.MaxDepth {
		return fmt.Errorf("nests deeper than %d levels at %s", l.MaxDepth, pathOrRoot(path))
	}
	switch v := v.(type) {
	case map[string]any:
		*keys += len(v)
		if *keys > l.MaxKeys {
			return fmt.Errorf("holds more than %d keys", l.MaxKeys)
		}
		for k, e := range v {
			if k == "" {
				return fmt.Errorf("has an empty key in %s", pathOrRoot(path))
			}
			if len(k) > l.MaxKeyLen {
				return fmt.Errorf("has a key of %d bytes in %s; at most %d", len(k), pathOrRoot(path), l.MaxKeyLen)
			}
			p := path + "/" + escapePointer(k)
			if e == nil && kind != kindPatch {
				return fmt.Errorf("has null at %s: a layer holds values only (a merge patch removes a key with null)", clip(p, 80))
			}
			if err := check(e, p, depth+1, kind, l, keys); err != nil {
				return err
			}
		}
	case []any:
		for i, e := range v {
			if err := check(e, fmt.Sprintf("%s/%d", path, i), depth+1, kind, l, keys); err != nil {
				return err
			}
		}
	}
	return nil
}

func pathOrRoot(p string) string {
	if p == "" {
		return "the top level"
	}
	return clip(p, 80)
}

// escapePointer escapes a member name as a JSON Pointer token (RFC 6901).
func escapePointer(k string) string {
	return strings.NewReplacer("~", "~0", "/", "~1").Replace(k)
}

// clip shortens s to at most n bytes, for messages about untrusted input.
func clip(s string, n int) string {
	if len(s) > n {
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
		return s[:n] + "…"
	}
	return s
}

// Encode writes a document as compact JSON with its keys sorted, so that
// equal documents encode to equal bytes. A nil document encodes as {}.
func Encode(d Doc) []byte {
	if d == nil {
		return []byte("{}")
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(d) // a Doc holds only what JSON decoding makes
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

// decode reads a document that fleetd stored itself.
func decode(raw []byte) (Doc, error) {
	if len(raw) == 0 {
		return Doc{}, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var d Doc
	if err := dec.Decode(&d); err != nil {
		return nil, err
	}
	if d == nil {
		d = Doc{}
	}
	return d, nil
}

// MergePatch applies an RFC 7396 JSON merge patch to a document and
// returns the result; target is not modified. A patch that is an object
// merges member by member, null removing a member; anything else replaces
// the target whole. The patch is applied by github.com/evanphx/json-patch
// (MergePatch); the caller bounds the result.
func MergePatch(target Doc, patch []byte) (any, error) {
	out, err := jsonpatch.MergePatch(Encode(target), patch)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(out))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	return v, nil
}

// Merge lays over on top of base and returns the result; neither is
// modified. Objects merge member by member, at every depth; any other value
// in over (arrays included) replaces base's. Layers hold no null, so this is
// RFC 7396's merge of over into base.
func Merge(base, over Doc) Doc {
	out := clone(base).(map[string]any)
	if out == nil {
		out = map[string]any{}
	}
	for k, v := range over {
		bm, bok := out[k].(map[string]any)
		om, ook := v.(map[string]any)
		if bok && ook {
			out[k] = Merge(bm, om)
			continue
		}
		out[k] = clone(v)
	}
	return out
}

func clone(v any) any {
	switch v := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(v))
		for k, e := range v {
			out[k] = clone(e)
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = clone(e)
		}
		return out
	}
	return v
}

// Difference is one place where a reported document differs from the
// desired one, as a JSON Pointer (RFC 6901) into both.
type Difference struct {
	Path string `json:"path"`
	// Kind is "changed" (both have it, with different values), "missing"
	// (desired, not reported) or "extra" (reported, not desired).
	Kind     string `json:"kind"`
	Desired  any    `json:"desired,omitempty"`
	Reported any    `json:"reported,omitempty"`
}

// Difference kinds.
const (
	DiffChanged = "changed"
	DiffMissing = "missing"
	DiffExtra   = "extra"
)

// Diff lists where reported differs from desired, sorted by path. Objects
// are compared member by member; other values whole, numbers by value
// (25 equals 25.0).
func Diff(desired, reported Doc) []Difference {
	var out []Difference
	diff("", desired, reported, &out)
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

func diff(path string, desired, reported map[string]any, out *[]Difference) {
	for k, dv := range desired {
		p := path + "/" + escapePointer(k)
		rv, ok := reported[k]
		if !ok {
			*out = append(*out, Difference{Path: p, Kind: DiffMissing, Desired: dv})
			continue
		}
		dm, dIsObj := dv.(map[string]any)
		rm, rIsObj := rv.(map[string]any)
		if dIsObj && rIsObj {
			diff(p, dm, rm, out)
			continue
		}
		if !Equal(dv, rv) {
			*out = append(*out, Difference{Path: p, Kind: DiffChanged, Desired: dv, Reported: rv})
		}
	}
	for k, rv := range reported {
		if _, ok := desired[k]; !ok {
			*out = append(*out, Difference{Path: path + "/" + escapePointer(k), Kind: DiffExtra, Reported: rv})
		}
	}
}

// Equal reports whether two decoded JSON values are equal: objects with the
// same members, arrays element by element, numbers by value.
func Equal(a, b any) bool {
	switch a := a.(type) {
	case map[string]any:
		bm, ok := b.(map[string]any)
		if !ok || len(a) != len(bm) {
			return false
		}
		for k, v := range a {
			w, ok := bm[k]
			if !ok || !Equal(v, w) {
				return false
			}
		}
		return true
	case []any:
		bs, ok := b.([]any)
		if !ok || len(a) != len(bs) {
			return false
		}
		for i := range a {
			if !Equal(a[i], bs[i]) {
				return false
			}
		}
		return true
	case json.Number:
		bn, ok := b.(json.Number)
		if !ok {
			return false
		}
		if a == bn {
			return true
		}
		x, ok1 := new(big.Float).SetString(string(a))
		y, ok2 := new(big.Float).SetString(string(bn))
		return ok1 && ok2 && x.Cmp(y) == 0
	}
	return a == b
}
