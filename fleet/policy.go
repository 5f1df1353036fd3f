package fleet

import (
	"fmt"
	"time"
)

// Policy is what operators set through /api/v1/compat/rules: the
// compatibility rules, the keepalive policy, and how much evidence flags a
// firmware. It is stored in PostgreSQL and applied without a restart.
type Policy struct {
	// Models are the compatibility rules per model ("*" for the rest).
	Models map[string]ModelRules `json:"models"`
	// Keepalive is the longest keepalive fleetd lets devices use.
	Keepalive KeepalivePolicy `json:"keepalive"`
	// Verdicts are the thresholds of learned verdicts; zero fields take the
	// defaults.
	Verdicts VerdictPolicy `json:"verdicts"`
	// VerdictWindowSeconds is how far back learned verdicts look; evidence
	// older than this ages out and the verdict expires (default a day).
	VerdictWindowSeconds int `json:"verdict_window_seconds"`
	// Link holds the thresholds of the WiFi link rules; zero fields take
	// the defaults.
	Link LinkPolicy `json:"link"`
}

// LinkPolicy returns the link thresholds with defaults for unset fields.
func (p Policy) LinkPolicy() LinkPolicy { return p.Link.withDefaults() }

// KeepalivePolicy caps keepalive below the idle timeout of the network's
// NATs and load balancers. MQTT 5 devices are told through the CONNACK's
// Server Keep Alive; MQTT 3 devices cannot be told, so their diagnosis says
// what to configure.
type KeepalivePolicy struct {
	// MaxSeconds applies to every model without its own entry (0 = no cap).
	MaxSeconds int `json:"max_seconds"`
	// Models overrides MaxSeconds per model.
	Models map[string]int `json:"models,omitempty"`
}

// For returns the keepalive cap of a model in seconds, 0 for none.
func (k KeepalivePolicy) For(model string) int {
	if s, ok := k.Models[model]; ok {
		return s
	}
	return k.MaxSeconds
}

// VerdictWindow returns the learning window.
func (p Policy) VerdictWindow() time.Duration {
	if p.VerdictWindowSeconds <= 0 {
		return 24 * time.Hour
	}
	return time.Duration(p.VerdictWindowSeconds) * time.Second
}

// VerdictPolicy returns the thresholds with defaults for unset fields.
func (p Policy) VerdictPolicy() VerdictPolicy {
	v, d := p.Verdicts, DefaultVerdictPolicy()
	if v.MinDevices == 0 {
		v.MinDevices = d.MinDevices
	}
	if v.MinDeviceHours == 0 {
		v.MinDeviceHours = d.MinDeviceHours
	}
	if v.MinEvents == 0 {
		v.MinEvents = d.MinEvents
	}
	if v.MinRate == 0 {
		v.MinRate = d.MinRate
	}
	if v.RateRatio == 0 {
		v.RateRatio = d.RateRatio
	}
	if v.ClearFraction == 0 {
		v.ClearFraction = d.ClearFraction
	}
	return v
}

// compiledPolicy is a Policy ready to judge devices; it is replaced whole,
// never changed.
type compiledPolicy struct {
	Policy
	rules CompiledRules
}

// compile validates a policy. Errors name the field.
func (p Policy) compile() (*compiledPolicy, error) {
	rules, err := CompatRules{Models: p.Models}.Compile()
	if err != nil {
		return nil, err
	}
	if p.Keepalive.MaxSeconds < 0 || p.Keepalive.MaxSeconds > 65535 {
		return nil, invalid("keepalive.max_seconds", "must be between 0 and 65535")
	}
	for m, s := range p.Keepalive.Models {
		if err := validateModel(m); err != nil || m == "" {
			return nil, invalid(fmt.Sprintf("keepalive.models.%s", m), "is not a model name")
		}
		if s < 0 || s > 65535 {
			return nil, invalid(fmt.Sprintf("keepalive.models.%s", m), "must be between 0 and 65535")
		}
	}
	v := p.Verdicts
	switch {
	case v.MinDevices < 0:
		return nil, invalid("verdicts.min_devices", "must not be negative")
	case v.MinDeviceHours < 0:
		return nil, invalid("verdicts.min_device_hours", "must not be negative")
	case v.MinEvents < 0:
		return nil, invalid("verdicts.min_events", "must not be negative")
	case v.MinRate < 0:
		return nil, invalid("verdicts.min_rate", "must not be negative")
	case v.RateRatio < 0:
		return nil, invalid("verdicts.rate_ratio", "must not be negative")
	case v.ClearFraction < 0 || v.ClearFraction > 1:
		return nil, invalid("verdicts.clear_fraction", "must be more than 0 and at most 1 (0 takes the default, %g)", DefaultVerdictPolicy().ClearFraction)
	case p.VerdictWindowSeconds < 0:
		return nil, invalid("verdict_window_seconds", "must not be negative")
	}
	if err := p.Link.validate(); err != nil {
		return nil, err
	}
	if p.Models == nil {
		p.Models = map[string]ModelRules{}
	}
	return &compiledPolicy{Policy: p, rules: rules}, nil
}
