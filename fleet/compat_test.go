package fleet

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// testRules describe a gateway whose early firmware speaks only MQTT 3.1.1,
// a sensor whose ranges overlap, and defaults for every other model.
var testRules = CompatRules{Models: map[string]ModelRules{
	"gw-100": {MinFirmware: "1.1.0", Firmware: []FirmwareRange{
		{Versions: ">=1.0.0, <1.2.0", Protocols: []string{"3.1.1"}, Features: []string{"ota"}},
		{Versions: ">=1.2.0", Protocols: []string{"3.1.1", "5"}, Features: []string{"ota", "server_keepalive"}},
	}},
	"sensor-s1": {Firmware: []FirmwareRange{
		{Versions: ">=1.0.0", Protocols: []string{"3.1.1"}},
		{Versions: ">=1.5.0, <2.0.0", Protocols: []string{"5"}, Features: []string{"ota"}},
		{Versions: "^3", Features: []string{"ota"}}, // any protocol
	}},
	"*": {MinFirmware: "2.0"},
}}

func TestCompatRulesValidate(t *testing.T) {
	fr := func(versions string, protocols, features []string) map[string]ModelRules {
		return map[string]ModelRules{"gw-100": {Firmware: []FirmwareRange{
			{Versions: ">=1.0.0"}, {Versions: versions, Protocols: protocols, Features: features},
		}}}
	}
	tests := []struct {
		name   string
		models map[string]ModelRules
		field  string // "" for valid rules
	}{
		{"test rules", testRules.Models, ""},
		{"no rules", nil, ""},
		{"only defaults", map[string]ModelRules{"*": {MinFirmware: "v1.2"}}, ""},
		{"empty model name", map[string]ModelRules{"": {}}, "models"},
		{"model name with a slash", map[string]ModelRules{"gw/100": {}}, "models.gw/100"},
		{"model name too long", map[string]ModelRules{string(make([]byte, 65)): {}}, "models." + string(make([]byte, 65))},
		{"min firmware not semver", map[string]ModelRules{"gw-100": {MinFirmware: "latest"}}, "models.gw-100.min_firmware"},
		{"versions missing", fr(" ", nil, nil), "models.gw-100.firmware[1].versions"},
		{"versions not a constraint", fr(">=banana", nil, nil), "models.gw-100.firmware[1].versions"},
		{"unknown protocol", fr(">=1.0.0", []string{"3.1.1", "4.0"}, nil), "models.gw-100.firmware[1].protocols[1]"},
		{"empty protocol", fr(">=1.0.0", []string{""}, nil), "models.gw-100.firmware[1].protocols[0]"},
		{"empty feature", fr(">=1.0.0", []string{"5"}, []string{"ota", ""}), "models.gw-100.firmware[1].features[1]"},
		{"first model by name", map[string]ModelRules{
			"zz": {MinFirmware: "x"}, "aa": {MinFirmware: "y"},
		}, "models.aa.min_firmware"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CompatRules{Models: tt.models}.Validate()
			var got string
			if err != nil {
				var ve *ValidationError
				if !errors.As(err, &ve) {
					t.Fatalf("got %T %v, want a *ValidationError", err, err)
				}
				got = ve.Field
			}
			if diff := cmp.Diff(tt.field, got); diff != "" {
				t.Errorf("field mismatch (-want +got):\n%s (error %v)", diff, err)
			}
		})
	}
}

func TestCompatCheck(t *testing.T) {
	rules, err := testRules.Compile()
	if err != nil {
		t.Fatal(err)
	}
	noDefaults, err := CompatRules{Models: map[string]ModelRules{"gw-100": testRules.Models["gw-100"]}}.Compile()
	if err != nil {
		t.Fatal(err)
	}
	below := func(fw, min, model string) Incompatibility {
		return Incompatibility{IncompatBelowMinimum, "firmware " + fw + " is below the minimum " + min + " for " + model}
	}
	tests := []struct {
		name     string
		rules    CompiledRules
		model    string
		firmware string
		protocol Protocol
		want     []Incompatibility
	}{
		{"supported", rules, "gw-100", "1.1.0", 4, nil},
		{"newer supports v5", rules, "gw-100", "1.2.0", 5, nil},
		{"below minimum", rules, "gw-100", "1.0.3", 4, []Incompatibility{below("1.0.3", "1.1.0", "model gw-100")}},
		{"below minimum and protocol", rules, "gw-100", "1.0.3", 5, []Incompatibility{
			below("1.0.3", "1.1.0", "model gw-100"),
			{IncompatProtocolUnsupported, "firmware 1.0.3 of model gw-100 does not support MQTT 5 (it supports MQTT 3.1.1)"},
		}},
		{"pre-release within a range", rules, "gw-100", "1.1.5-beta.1", 5, []Incompatibility{
			{IncompatProtocolUnsupported, "firmware 1.1.5-beta.1 of model gw-100 does not support MQTT 5 (it supports MQTT 3.1.1)"},
		}},
		{"pre-release of the minimum is below it", rules, "gw-100", "1.1.0-rc.1", 4, []Incompatibility{below("1.1.0-rc.1", "1.1.0", "model gw-100")}},
		{"v prefix", rules, "gw-100", "v1.2.0", 5, nil},
		{"no range matches: protocol not judged", rules, "gw-100", "0.9.0", 5, []Incompatibility{below("0.9.0", "1.1.0", "model gw-100")}},
		{"unknown protocol not judged", rules, "gw-100", "1.0.3", 0, []Incompatibility{below("1.0.3", "1.1.0", "model gw-100")}},
		{"free-form firmware not judged", rules, "gw-100", "dev-build-7f3a", 5, nil},
		{"empty firmware not judged", rules, "gw-100", "", 5, nil},
		{"overlapping ranges: any lists it", rules, "sensor-s1", "1.6.0", 5, nil},
		{"overlapping ranges: the other one", rules, "sensor-s1", "1.6.0", 4, nil},
		{"overlapping ranges: neither", rules, "sensor-s1", "1.6.0", 3, []Incompatibility{
			{IncompatProtocolUnsupported, "firmware 1.6.0 of model sensor-s1 does not support MQTT 3.1 (it supports MQTT 3.1.1 or 5)"},
		}},
		{"outside the second range", rules, "sensor-s1", "2.1.0", 5, []Incompatibility{
			{IncompatProtocolUnsupported, "firmware 2.1.0 of model sensor-s1 does not support MQTT 5 (it supports MQTT 3.1.1)"},
		}},
		{"a range without protocols allows any", rules, "sensor-s1", "3.0.1", 3, nil},
		{"other model gets the defaults", rules, "ap-7", "1.9.0", 5, []Incompatibility{below("1.9.0", "2.0", "model ap-7")}},
		{"no model gets the defaults", rules, "", "1.9.0", 5, []Incompatibility{below("1.9.0", "2.0", "devices without a model")}},
		{"defaults satisfied", rules, "ap-7", "2.0.0", 5, nil},
		{"no defaults", noDefaults, "ap-7", "0.0.1", 5, nil},
		{"zero rules", CompiledRules{}, "gw-100", "0.0.1", 5, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.rules.Check(tt.model, tt.firmware, tt.protocol)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestCompatSupports(t *testing.T) {
	rules, err := testRules.Compile()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name                     string
		model, firmware, feature string
		want                     bool
	}{
		{"listed", "gw-100", "1.0.3", "ota", true},
		{"not yet", "gw-100", "1.1.9", "server_keepalive", false},
		{"from 1.2.0", "gw-100", "1.2.0", "server_keepalive", true},
		{"no range matches", "gw-100", "0.9.0", "ota", false},
		{"second of overlapping ranges", "sensor-s1", "1.7.0", "ota", true},
		{"first range only", "sensor-s1", "1.2.0", "ota", false},
		{"unknown feature", "gw-100", "1.2.0", "teleport", false},
		{"free-form firmware", "gw-100", "nightly", "ota", false},
		{"defaults have no features", "ap-7", "3.0.0", "ota", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := rules.Supports(tt.model, tt.firmware, tt.feature); got != tt.want {
				t.Errorf("Supports(%q, %q, %q) = %v, want %v", tt.model, tt.firmware, tt.feature, got, tt.want)
			}
		})
	}
}
