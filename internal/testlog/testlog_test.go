package testlog

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLastProblems(t *testing.T) {
	log := strings.Join([]string{
		`{"level":"INFO","msg":"a"}`,
		`{"level":"WARN","msg":"b"}`,
		`{"level":"ERROR","msg":"c"}`,
		`time=x level=WARN msg=d`,
		`[ALERT]    (1) : e`,
		`{"level":"DEBUG","msg":"f"}`,
		`panic: g`,
	}, "\n")
	got := lastProblems(log, 3)
	want := []string{`time=x level=WARN msg=d`, `[ALERT]    (1) : e`, `panic: g`}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("lastProblems = %q, want %q", got, want)
	}
	if got := lastProblems(`{"level":"INFO"}`, 3); len(got) != 0 {
		t.Errorf("lastProblems of a clean log = %q", got)
	}
}

func TestWriteKeepsEachLog(t *testing.T) {
	t.Setenv(EnvDir, t.TempDir())
	a, err := write("TestX/sub case", "fleetd r1", "one\n")
	if err != nil {
		t.Fatal(err)
	}
	b, err := write("TestX/sub case", "fleetd r1", "two\n")
	if err != nil {
		t.Fatal(err)
	}
	if a == b || filepath.Dir(a) != filepath.Dir(b) || strings.ContainsAny(filepath.Base(filepath.Dir(a)), " /") {
		t.Fatalf("paths %s and %s: want two files in one directory named after the test", a, b)
	}
	if got, _ := os.ReadFile(b); string(got) != "two\n" {
		t.Errorf("%s holds %q", b, got)
	}
}
