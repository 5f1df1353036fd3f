package firmware

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/Masterminds/semver/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

func TestCampaignValidate(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(*Campaign)
		field string // "" = valid
	}{
		{name: "valid", edit: func(*Campaign) {}},
		{name: "valid with abort", edit: func(c *Campaign) { c.GateAction = GateActionAbort }},
		{name: "valid with pause", edit: func(c *Campaign) { c.GateAction = GateActionPause }},
		{name: "valid canary-only campaign", edit: func(c *Campaign) { c.Stages = c.Stages[:1] }},
		{name: "valid last stage is a count", edit: func(c *Campaign) {
			c.Stages = []Stage{{Percent: 10, MaxNotBackOnline: -1}, {Count: 20}}
		}},
		{name: "valid equal percents", edit: func(c *Campaign) { c.Stages[2].Percent = 10 }},
		{name: "valid zero soak", edit: func(c *Campaign) { c.Stages[0].Soak = 0 }},
		{name: "valid fractional percent", edit: func(c *Campaign) { c.Stages[1].Percent = 0.5 }},

		{name: "name missing", edit: func(c *Campaign) { c.Name = "  " }, field: "name"},
		{name: "firmware missing", edit: func(c *Campaign) { c.FirmwareID = "" }, field: "firmware_id"},
		{name: "no stages", edit: func(c *Campaign) { c.Stages = nil }, field: "stages"},
		{name: "count and percent", edit: func(c *Campaign) { c.Stages[1].Count = 3 }, field: "stages[1]"},
		{name: "neither count nor percent", edit: func(c *Campaign) { c.Stages[0].Count = 0 }, field: "stages[0]"},
		{name: "negative count", edit: func(c *Campaign) { c.Stages[0].Count = -1 }, field: "stages[0].count"},
		{name: "negative percent", edit: func(c *Campaign) { c.Stages[1].Percent = -10 }, field: "stages[1].percent"},
		{name: "percent over 100", edit: func(c *Campaign) { c.Stages[3].Percent = 101 }, field: "stages[3].percent"},
		{name: "percent decreases", edit: func(c *Campaign) { c.Stages[2].Percent = 5 }, field: "stages[2].percent"},
		{name: "last percent below 100", edit: func(c *Campaign) { c.Stages[3].Percent = 90 }, field: "stages[3].percent"},
		{name: "negative soak", edit: func(c *Campaign) { c.Stages[1].Soak = Duration(-time.Second) }, field: "stages[1].soak"},
		{name: "failure rate above 1", edit: func(c *Campaign) { c.Stages[0].MaxFailureRate = 1.5 }, field: "stages[0].max_failure_rate"},
		{name: "negative failure rate", edit: func(c *Campaign) { c.Stages[2].MaxFailureRate = -0.1 }, field: "stages[2].max_failure_rate"},
		{name: "not back online below -1", edit: func(c *Campaign) { c.Stages[0].MaxNotBackOnline = -2 }, field: "stages[0].max_not_back_online"},
		{name: "negative connectivity ratio", edit: func(c *Campaign) { c.Stages[0].ConnectivityRatio = -1 }, field: "stages[0].connectivity_ratio"},
		{name: "negative devices per minute", edit: func(c *Campaign) { c.Pacing.DevicesPerMinute = -1 }, field: "pacing.devices_per_minute"},
		{name: "negative max concurrent", edit: func(c *Campaign) { c.Pacing.MaxConcurrent = -1 }, field: "pacing.max_concurrent"},
		{name: "zero device timeout", edit: func(c *Campaign) { c.DeviceTimeout = 0 }, field: "device_timeout"},
		{name: "negative device timeout", edit: func(c *Campaign) { c.DeviceTimeout = Duration(-time.Minute) }, field: "device_timeout"},
		{name: "valid follow with a last percent stage", edit: func(c *Campaign) { c.Follow = true }},
		{name: "follow with a last count stage", edit: func(c *Campaign) {
			c.Follow, c.Stages = true, []Stage{{Percent: 10, MaxNotBackOnline: -1}, {Count: 20}}
		}, field: "follow"},
		{name: "unknown gate action", edit: func(c *Campaign) { c.GateAction = "rollback" }, field: "gate_action"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testCampaign()
			tt.edit(&c)
			before := fmt.Sprintf("%+v", c)
			err := c.Validate()
			if after := fmt.Sprintf("%+v", c); after != before {
				t.Errorf("Validate changed the campaign")
			}
			if tt.field == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("Validate() = %v, want a *ValidationError for %s", err, tt.field)
			}
			if diff := cmp.Diff(tt.field, ve.FieldName()); diff != "" {
				t.Errorf("field mismatch (-want +got):\n%s\nerror: %v", diff, err)
			}
			if !strings.HasPrefix(err.Error(), tt.field+": ") || ve.Msg == "" {
				t.Errorf("error %q does not name %s with a message", err, tt.field)
			}
		})
	}
}

func TestCampaignNormalize(t *testing.T) {
	c := testCampaign()
	c.Normalize()
	if diff := cmp.Diff(GateActionPause, c.GateAction); diff != "" {
		t.Errorf("default gate action mismatch (-want +got):\n%s", diff)
	}
	c.GateAction = GateActionAbort
	c.Normalize()
	if diff := cmp.Diff(GateActionAbort, c.GateAction); diff != "" {
		t.Errorf("explicit gate action mismatch (-want +got):\n%s", diff)
	}
}

func TestCampaignDurationJSON(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Duration
		wantErr bool
	}{
		{name: "string", in: `"30s"`, want: Duration(30 * time.Second)},
		{name: "compound string", in: `"1h30m"`, want: Duration(90 * time.Minute)},
		{name: "seconds", in: `45`, want: Duration(45 * time.Second)},
		{name: "fractional seconds", in: `1.5`, want: Duration(1500 * time.Millisecond)},
		{name: "zero", in: `0`, want: 0},
		{name: "bad string", in: `"soon"`, wantErr: true},
		{name: "bool", in: `true`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var d Duration
			err := json.Unmarshal([]byte(tt.in), &d)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Unmarshal(%s) error = %v, wantErr %v", tt.in, err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, d); !tt.wantErr && diff != "" {
				t.Errorf("Unmarshal(%s) mismatch (-want +got):\n%s", tt.in, diff)
			}
		})
	}

	s := Stage{Name: "canary", Count: 5, Soak: Duration(90 * time.Second), MaxNotBackOnline: -1}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(`{"name":"canary","count":5,"soak":"1m30s","max_failure_rate":0,"max_not_back_online":-1}`, string(b)); diff != "" {
		t.Errorf("Marshal mismatch (-want +got):\n%s", diff)
	}
	var back Stage
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(s, back); diff != "" {
		t.Errorf("round trip mismatch (-want +got):\n%s", diff)
	}
}

func TestStageTargets(t *testing.T) {
	canaryThenPercents := []Stage{{Count: 5}, {Percent: 10}, {Percent: 50}, {Percent: 100}}
	tests := []struct {
		name   string
		stages []Stage
		total  int
		want   []int
	}{
		{name: "canary 5 then 10/50/100 % of 100", stages: canaryThenPercents, total: 100, want: []int{5, 5, 40, 50}},
		{name: "canary 5 then 10/50/100 % of 3", stages: canaryThenPercents, total: 3, want: []int{3, 0, 0, 0}},
		{name: "canary 5 then 10/50/100 % of 7", stages: canaryThenPercents, total: 7, want: []int{5, 0, 0, 2}},
		{name: "percents round up", stages: []Stage{{Percent: 10}, {Percent: 50}, {Percent: 100}}, total: 7, want: []int{1, 3, 3}},
		{name: "small percent of a small fleet reaches one device", stages: []Stage{{Percent: 1}, {Percent: 100}}, total: 3, want: []int{1, 2}},
		{name: "float noise does not round up (64.4 % of 250 = 161)", stages: []Stage{{Percent: 64.4}, {Percent: 100}}, total: 250, want: []int{161, 89}},
		{name: "count capped at what is left", stages: []Stage{{Count: 5}, {Count: 10}}, total: 12, want: []int{5, 7}},
		{name: "count-only campaign leaves the rest", stages: []Stage{{Count: 5}, {Count: 10}}, total: 100, want: []int{5, 10}},
		{name: "percent already reached by a count is empty", stages: []Stage{{Count: 20}, {Percent: 10}, {Percent: 100}}, total: 100, want: []int{20, 0, 80}},
		{name: "equal percents", stages: []Stage{{Percent: 50}, {Percent: 50}, {Percent: 100}}, total: 10, want: []int{5, 0, 5}},
		{name: "no devices", stages: canaryThenPercents, total: 0, want: []int{0, 0, 0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := make([]int, len(tt.stages))
			for i := range tt.stages {
				got[i] = StageTargets(tt.stages, tt.total, i)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("StageTargets mismatch (-want +got):\n%s", diff)
			}
		})
	}

	t.Run("out of range", func(t *testing.T) {
		for _, i := range []int{-1, 4} {
			if got := StageTargets(canaryThenPercents, 100, i); got != 0 {
				t.Errorf("StageTargets(i=%d) = %d, want 0", i, got)
			}
		}
	})

	t.Run("a campaign ending at 100 percent covers every device exactly once", func(t *testing.T) {
		stages := []Stage{{Count: 3}, {Percent: 1}, {Percent: 12.5}, {Percent: 33.3}, {Percent: 64.4}, {Percent: 100}}
		for total := 0; total <= 2000; total++ {
			sum := 0
			for i := range stages {
				n := StageTargets(stages, total, i)
				if n < 0 {
					t.Fatalf("total %d stage %d: %d devices", total, i, n)
				}
				sum += n
			}
			if sum != total {
				t.Fatalf("total %d: stages cover %d devices", total, sum)
			}
		}
	})
}

func TestSelectDevices(t *testing.T) {
	ids := make([]string, 50)
	for i := range ids {
		ids[i] = fmt.Sprintf("gw-%03d", i)
	}
	input := slices.Clone(ids)

	got := SelectDevices("cmp-1", ids)

	t.Run("input untouched", func(t *testing.T) {
		if diff := cmp.Diff(input, ids); diff != "" {
			t.Errorf("input changed (-want +got):\n%s", diff)
		}
	})
	t.Run("deterministic", func(t *testing.T) {
		if diff := cmp.Diff(got, SelectDevices("cmp-1", ids)); diff != "" {
			t.Errorf("second call mismatch (-want +got):\n%s", diff)
		}
	})
	t.Run("permutation of the input", func(t *testing.T) {
		if diff := cmp.Diff(ids, got, cmpopts.SortSlices(func(a, b string) bool { return a < b })); diff != "" {
			t.Errorf("not a permutation (-want +got):\n%s", diff)
		}
		if len(got) != len(ids) {
			t.Errorf("got %d ids, want %d", len(got), len(ids))
		}
	})
	t.Run("independent of input order", func(t *testing.T) {
		reversed := slices.Clone(ids)
		slices.Reverse(reversed)
		rotated := append(slices.Clone(ids[17:]), ids[:17]...)
		for _, in := range [][]string{reversed, rotated} {
			if diff := cmp.Diff(got, SelectDevices("cmp-1", in)); diff != "" {
				t.Errorf("order depends on input (-want +got):\n%s", diff)
			}
		}
	})
	t.Run("not alphabetical", func(t *testing.T) {
		if slices.Equal(got, ids) {
			t.Errorf("SelectDevices kept the alphabetical order")
		}
	})
	t.Run("another campaign picks other canaries", func(t *testing.T) {
		other := SelectDevices("cmp-2", ids)
		if slices.Equal(got, other) {
			t.Fatalf("cmp-1 and cmp-2 order the devices the same way")
		}
		if slices.Equal(got[:5], other[:5]) {
			t.Errorf("cmp-1 and cmp-2 share the same 5 canaries: %v", got[:5])
		}
	})
	t.Run("duplicates and empty", func(t *testing.T) {
		if diff := cmp.Diff([]string{"a", "a"}, SelectDevices("c", []string{"a", "a"})); diff != "" {
			t.Errorf("duplicates mismatch (-want +got):\n%s", diff)
		}
		if got := SelectDevices("c", nil); len(got) != 0 {
			t.Errorf("SelectDevices(nil) = %v, want empty", got)
		}
	})
}

func TestFollowMatches(t *testing.T) {
	target := semverMust("2.0.0")
	tests := []struct {
		name, firmware string
		constraint     string
		want           bool
	}{
		{name: "older version joins", firmware: "1.0.0", want: true},
		{name: "the target version is not touched", firmware: "2.0.0", want: false},
		{name: "a newer version is not touched", firmware: "2.1.0", want: false},
		{name: "a non-semver version without a constraint joins", firmware: "nightly", want: true},
		{name: "constraint passes", firmware: "1.9.9", constraint: "<2.0.0", want: true},
		{name: "constraint fails", firmware: "1.9.9", constraint: "<1.5.0", want: false},
		{name: "a non-semver version does not pass a constraint", firmware: "nightly", constraint: "<2.0.0", want: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c *semver.Constraints
			if tt.constraint != "" {
				c = semverConstraint(t, tt.constraint)
			}
			if got := followMatches(tt.firmware, "2.0.0", target, c); got != tt.want {
				t.Errorf("followMatches(%q, constraint %q) = %v, want %v", tt.firmware, tt.constraint, got, tt.want)
			}
		})
	}
}

func semverMust(v string) *semver.Version { return semver.MustParse(v) }

func semverConstraint(t *testing.T, s string) *semver.Constraints {
	t.Helper()
	c, err := semver.NewConstraint(s)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
