package deploy_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

var metricName = regexp.MustCompile(`\bfleetd_[a-z_]+\b`)

// alertProblems lists what is wrong with a rules file: every rule has a
// name, an expression, a severity and a summary, and names only metrics in
// exported (the metric names fleetd's code registers).
func alertProblems(data []byte, exported map[string]bool) []string {
	var f ruleFile
	if err := yaml.Unmarshal(data, &f); err != nil {
		return []string{err.Error()}
	}
	var out []string
	n := 0
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			n++
			if r.Alert == "" || r.Expr == "" || r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
				out = append(out, "rule "+r.Alert+": needs alert, expr, labels.severity and annotations.summary")
			}
			for _, m := range metricName.FindAllString(r.Expr, -1) {
				if !exported[m] {
					out = append(out, "rule "+r.Alert+": fleetd exports no metric "+m)
				}
			}
		}
	}
	if n == 0 {
		out = append(out, "no rules")
	}
	return out
}

// exportedMetrics reads the metric names registered in fleetd's code
// (Name: "fleetd_…" in a non-test Go file).
func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	decl := regexp.MustCompile(`Name:\s*"(fleetd_[a-z_]+)"`)
	out := map[string]bool{}
	err := filepath.WalkDir(repoRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "node_modules" || strings.HasPrefix(d.Name(), ".")) && p != repoRoot {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, m := range decl.FindAllSubmatch(b, -1) {
			out[string(m[1])] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) < 20 {
		t.Fatalf("found only %d metric names in the code", len(out))
	}
	return out
}

func TestAlertRules(t *testing.T) {
	exported := exportedMetrics(t)
	data, err := os.ReadFile(filepath.Join("prometheus", "alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range alertProblems(data, exported) {
		t.Error(p)
	}
	// The checks catch the mistakes they are for.
	for name, bad := range map[string]string{
		"unknown metric": "groups: [{name: x, rules: [{alert: A, expr: fleetd_no_such_metric > 0, labels: {severity: page}, annotations: {summary: s}}]}]",
		"no severity":    "groups: [{name: x, rules: [{alert: A, expr: fleetd_mqtt_sessions > 0, annotations: {summary: s}}]}]",
		"no rules":       "groups: []",
	} {
		if len(alertProblems([]byte(bad), exported)) == 0 {
			t.Errorf("%s: not caught", name)
		}
	}
}
