package fleet

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/Masterminds/semver/v3"
)

// CompatRules are what operators state about firmware: per model, the
// minimum supported firmware and, per firmware version range, the MQTT
// protocol versions and features that firmware supports. They are plain data
// so that they can be loaded from a file and reloaded on SIGHUP; Compile turns
// them into the form that judges devices.
type CompatRules struct {
	// Models maps a device model to its rules; the key "*" applies to models
	// without their own entry (including devices that reported no model).
	Models map[string]ModelRules `json:"models" yaml:"models"`
}

// AnyModel is the CompatRules.Models key whose rules apply to every model
// without its own entry.
const AnyModel = "*"

// ModelRules are the rules for one model.
type ModelRules struct {
	// MinFirmware is a semantic version; devices below it are incompatible.
	MinFirmware string `json:"min_firmware,omitempty" yaml:"min_firmware,omitempty"`
	// Firmware says what each range of firmware versions supports.
	Firmware []FirmwareRange `json:"firmware,omitempty" yaml:"firmware,omitempty"`
}

// FirmwareRange says what the firmware versions matching a constraint support.
type FirmwareRange struct {
	// Versions is a semver constraint, e.g. ">=1.0.0, <1.2.0".
	Versions string `json:"versions" yaml:"versions"`
	// Protocols lists the MQTT versions ("3.1", "3.1.1", "5") the firmware
	// speaks; empty means any.
	Protocols []string `json:"protocols,omitempty" yaml:"protocols,omitempty"`
	// Features are free-form capability names, e.g. "ota" or
	// "server_keepalive"; empty means none.
	Features []string `json:"features,omitempty" yaml:"features,omitempty"`
}

// Incompatibility reasons. The first two come from operator rules, the last
// from learned verdicts (see LearnVerdicts).
const (
	IncompatBelowMinimum        = "below_minimum_firmware"
	IncompatProtocolUnsupported = "protocol_unsupported"
	IncompatRejectsPings        = "rejects_pings"
)

// Incompatibility says why a device's firmware does not fit the fleet.
type Incompatibility struct {
	// Reason is one of the Incompat* constants.
	Reason string `json:"reason"`
	// Detail is a sentence for an operator that names the versions involved.
	Detail string `json:"detail"`
}

// Validate reports the first problem in the rules as a *ValidationError whose
// Field is the JSON path of the bad value, e.g. "models.gw-100.min_firmware"
// or "models.gw-100.firmware[1].versions". Models are checked in name order so
// that the same rules always report the same problem.
func (r CompatRules) Validate() error {
	_, err := r.Compile()
	return err
}

// Compile validates the rules and parses every version and constraint once,
// so that judging a fleet of 100 000 devices does not parse semver 100 000
// times. It returns the first problem as Validate does.
func (r CompatRules) Compile() (CompiledRules, error) {
	c := CompiledRules{models: make(map[string]compiledModel, len(r.Models))}
	names := make([]string, 0, len(r.Models))
	for name := range r.Models {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		field := "models." + name
		switch {
		case name == "":
			return CompiledRules{}, invalid("models", "holds an empty model name; use %q for rules that apply to every model", AnyModel)
		case name != AnyModel:
			if err := validateModel(name); err != nil {
				return CompiledRules{}, invalid(field, "model name %s", err.(*ValidationError).Msg)
			}
		}
		m, err := compileModel(field, r.Models[name])
		if err != nil {
			return CompiledRules{}, err
		}
		c.models[name] = m
	}
	return c, nil
}

func compileModel(field string, m ModelRules) (compiledModel, error) {
	var cm compiledModel
	if m.MinFirmware != "" {
		v, err := semver.NewVersion(m.MinFirmware)
		if err != nil {
			return cm, invalid(field+".min_firmware", "%q is not a semantic version", m.MinFirmware)
		}
		cm.min = v
	}
	for i, fr := range m.Firmware {
		rf := fmt.Sprintf("%s.firmware[%d]", field, i)
		if strings.TrimSpace(fr.Versions) == "" {
			return cm, invalid(rf+".versions", "is required")
		}
		cons, err := semver.NewConstraint(fr.Versions)
		if err != nil {
			return cm, invalid(rf+".versions", "%q is not a version constraint: %v", fr.Versions, err)
		}
		// Devices run beta builds too: ">=1.0.0, <1.2.0" should cover
		// 1.1.0-beta.2, which semver excludes by default.
		cons.IncludePrerelease = true
		cr := compiledRange{versions: cons, features: fr.Features}
		for j, p := range fr.Protocols {
			pv, err := ParseProtocol(p)
			if err == nil && pv == 0 {
				err = fmt.Errorf("is empty")
			}
			if err != nil {
				return cm, invalid(fmt.Sprintf("%s.protocols[%d]", rf, j), "%v", err)
			}
			cr.protocols = append(cr.protocols, pv)
		}
		for j, f := range fr.Features {
			if strings.TrimSpace(f) == "" {
				return cm, invalid(fmt.Sprintf("%s.features[%d]", rf, j), "is empty")
			}
		}
		cm.ranges = append(cm.ranges, cr)
	}
	return cm, nil
}

// CompiledRules are CompatRules ready to judge devices. The zero value has no
// rules and judges nothing. It is immutable, so one value can be shared by
// every goroutine and swapped whole on reload.
type CompiledRules struct {
	models map[string]compiledModel
}

type compiledModel struct {
	min    *semver.Version
	ranges []compiledRange
}

type compiledRange struct {
	versions  *semver.Constraints
	protocols []Protocol // empty: any
	features  []string
}

// rules returns the rules that apply to a model: its own, else the "*" ones.
func (c CompiledRules) rules(model string) (compiledModel, bool) {
	if m, ok := c.models[model]; ok {
		return m, true
	}
	m, ok := c.models[AnyModel]
	return m, ok
}

// Check returns why a device with this model, firmware and protocol is
// incompatible, or nil when it is not.
//
// Firmware versions that do not parse as semantic versions are not judged:
// devices report free-form strings ("dev-build", a git hash), and calling
// every such device incompatible would start upgrade campaigns against
// firmware nobody has described. An unknown protocol (0) is not judged either.
// When several ranges match the firmware, a protocol is supported if any of
// them lists it (or lists none); a firmware that matches no range is not
// judged on protocol, because the rules say nothing about it.
func (c CompiledRules) Check(model, firmware string, protocol Protocol) []Incompatibility {
	m, ok := c.rules(model)
	if !ok {
		return nil
	}
	v, err := semver.NewVersion(firmware)
	if err != nil {
		return nil
	}
	var out []Incompatibility
	if m.min != nil && v.LessThan(m.min) {
		out = append(out, Incompatibility{Reason: IncompatBelowMinimum,
			Detail: fmt.Sprintf("firmware %s is below the minimum %s for %s", firmware, m.min.Original(), modelPhrase(model))})
	}
	if protocol == 0 {
		return out
	}
	matched, supported := false, false
	var speaks []Protocol
	for _, r := range m.ranges {
		if !r.versions.Check(v) {
			continue
		}
		matched = true
		if len(r.protocols) == 0 || slices.Contains(r.protocols, protocol) {
			supported = true
			break
		}
		speaks = append(speaks, r.protocols...)
	}
	if matched && !supported {
		out = append(out, Incompatibility{Reason: IncompatProtocolUnsupported,
			Detail: fmt.Sprintf("firmware %s of %s does not support MQTT %s (it supports MQTT %s)",
				firmware, modelPhrase(model), protocol, protocolList(speaks))})
	}
	return out
}

// Supports reports whether a model's firmware has a feature: some range that
// matches the firmware lists it. Unparseable firmware versions have no
// features, for the reason given on Check.
func (c CompiledRules) Supports(model, firmware, feature string) bool {
	m, ok := c.rules(model)
	if !ok {
		return false
	}
	v, err := semver.NewVersion(firmware)
	if err != nil {
		return false
	}
	for _, r := range m.ranges {
		if slices.Contains(r.features, feature) && r.versions.Check(v) {
			return true
		}
	}
	return false
}

func modelPhrase(model string) string {
	if model == "" {
		return "devices without a model"
	}
	return "model " + model
}

// protocolList names protocols in ascending order without repeats: "3.1 or 3.1.1".
func protocolList(ps []Protocol) string {
	ps = slices.Clone(ps)
	slices.Sort(ps)
	ps = slices.Compact(ps)
	names := make([]string, len(ps))
	for i, p := range ps {
		names[i] = p.String()
	}
	return strings.Join(names, " or ")
}
