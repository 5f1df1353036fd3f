package devconfig

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

// Kind is what a layer applies to.
type Kind string

// Layer kinds, lowest precedence first; a device's own layer comes last.
const (
	KindFleet    Kind = "fleet"     // every device
	KindModel    Kind = "model"     // devices of one model
	KindTag      Kind = "tag"       // devices with one tag (site=lyon, canary)
	KindModelTag Kind = "model_tag" // devices of one model with one tag
)

// rank orders the kinds in a resolution.
func (k Kind) rank() int {
	switch k {
	case KindFleet:
		return 0
	case KindModel:
		return 1
	case KindTag:
		return 2
	}
	return 3
}

// Scope names what a layer applies to. It is written "fleet",
// "model:gw-100", "tag:site=lyon" or "model:gw-100,tag:site=lyon" (the
// model and the tag: "all gw-100 at site=lyon").
type Scope struct {
	Kind  Kind
	Model string
	Tag   string
}

// String writes the scope as ParseScope reads it.
func (s Scope) String() string {
	switch s.Kind {
	case KindFleet:
		return "fleet"
	case KindModel:
		return "model:" + s.Model
	case KindTag:
		return "tag:" + s.Tag
	}
	return "model:" + s.Model + ",tag:" + s.Tag
}

// MarshalText writes the scope as a string.
func (s Scope) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a scope string.
func (s *Scope) UnmarshalText(b []byte) error {
	v, err := ParseScope(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// ParseScope reads a scope. Models and tags follow the device registry's
// rules (fleet.NewDevice.Validate), so a scope can name exactly what a
// device can carry. Errors are *ValidationError naming field "scope".
func ParseScope(s string) (Scope, error) {
	if s == "fleet" {
		return Scope{Kind: KindFleet}, nil
	}
	bad := func(why string) (Scope, error) {
		return Scope{}, invalid("scope", "%s is not a layer scope: %s (want fleet, model:M, tag:T or model:M,tag:T)",
			strconv.QuoteToASCII(clip(s, 60)), why)
	}
	var sc Scope
	parts := strings.Split(s, ",")
	if len(parts) > 2 {
		return bad("more than two parts")
	}
	for i, p := range parts {
		name, value, ok := strings.Cut(p, ":")
		if !ok || value == "" {
			return bad("a part without a value")
		}
		switch {
		case name == "model" && i == 0:
			sc.Model = value
		case name == "tag" && sc.Tag == "" && (i == 1 || len(parts) == 1):
			sc.Tag = value
		default:
			return bad("unexpected " + strconv.QuoteToASCII(clip(name, 20)))
		}
	}
	if sc.Model != "" && len(parts) == 2 && sc.Tag == "" {
		return bad("a model combines with a tag only")
	}
	check := fleet.NewDevice{ID: "scope", Model: sc.Model}
	if sc.Tag != "" {
		check.Tags = []string{sc.Tag}
	}
	if err := check.Validate(); err != nil {
		return bad(err.Error())
	}
	switch {
	case sc.Model != "" && sc.Tag != "":
		sc.Kind = KindModelTag
	case sc.Model != "":
		sc.Kind = KindModel
	default:
		sc.Kind = KindTag
	}
	return sc, nil
}

// Applies reports whether the layer applies to a device of model with tags.
func (s Scope) Applies(model string, tags []string) bool {
	switch s.Kind {
	case KindFleet:
		return true
	case KindModel:
		return model != "" && model == s.Model
	case KindTag:
		return slices.Contains(tags, s.Tag)
	}
	return model != "" && model == s.Model && slices.Contains(tags, s.Tag)
}

// before orders layers in a resolution: by kind, then by tag, then by model.
func (s Scope) before(o Scope) bool {
	if s.Kind.rank() != o.Kind.rank() {
		return s.Kind.rank() < o.Kind.rank()
	}
	if s.Tag != o.Tag {
		return s.Tag < o.Tag
	}
	return s.Model < o.Model
}

// Layer is one operator-written configuration layer.
type Layer struct {
	Scope  Scope `json:"scope"`
	Config Doc   `json:"config"`
	// Revision counts the layer's changes.
	Revision  int64     `json:"revision"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// DeviceScope is the source name of a device's own layer in Resolve.
const DeviceScope = "device"

// Resolve merges the layers that apply to a device of model with tags, and
// then the device's own layer, into its effective document: fleet < model
// < tag < model and tag < device. Tag layers apply in the order of their
// tag (byte order), so that a device with two tags that set the same key
// gets the same answer every time; the later tag wins. It returns the
// document and the scopes that contributed, in the order applied. It is
// pure: the store calls it for every device it re-resolves.
func Resolve(layers []Layer, model string, tags []string, own Doc) (Doc, []string) {
	var apply []Layer
	for _, l := range layers {
		if l.Scope.Applies(model, tags) {
			apply = append(apply, l)
		}
	}
	slices.SortFunc(apply, func(a, b Layer) int {
		switch {
		case a.Scope.before(b.Scope):
			return -1
		case b.Scope.before(a.Scope):
			return 1
		}
		return 0
	})
	eff := Doc{}
	sources := []string{}
	for _, l := range apply {
		eff = Merge(eff, l.Config)
		sources = append(sources, l.Scope.String())
	}
	if len(own) > 0 {
		eff = Merge(eff, own)
		sources = append(sources, DeviceScope)
	}
	return eff, sources
}

// tooLarge is the problem recorded for a device whose layers merge into
// more than the limit.
func tooLarge(n, max int) string {
	return fmt.Sprintf("the layers merge into %d bytes, more than %d: the device keeps its previous document", n, max)
}
