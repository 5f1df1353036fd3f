// Package testlog keeps the logs of the processes a failed test started
// (fleetd replicas, HAProxy) in files, and says in the test's output where
// they are with their last warnings and errors.
//
// Printing whole logs into the test output buried the failure itself: go
// test prints a test's own messages first and its cleanups' output after
// them, so three replicas' logs pushed the line that said what failed out of
// the part of a CI log anyone reads (its tail).
package testlog

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// EnvDir names the directory the logs are kept in; by default
// $TMPDIR/fleetd-test-logs.
const EnvDir = "FLEETD_TEST_LOG_DIR"

// tail is how many warning and error lines a failure shows inline.
const tail = 2

// Keep writes log (what the process called name printed) to a file named
// after the test and name, and logs its path with the last few lines that
// report a warning or an error. It is meant for a cleanup that runs when
// t.Failed().
func Keep(t testing.TB, name, log string) {
	t.Helper()
	path, err := write(t.Name(), name, log)
	if err != nil {
		// Without a file, the output is the only place left for it.
		t.Logf("%s log (not kept in a file: %v):\n%s", name, err, log)
		return
	}
	lines := strings.Count(log, "\n")
	if worst := lastProblems(log, tail); len(worst) > 0 {
		t.Logf("%s log: %d lines in %s; its last warnings and errors:\n%s", name, lines, path, strings.Join(worst, "\n"))
		return
	}
	t.Logf("%s log: %d lines in %s, no warning or error", name, lines, path)
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

func write(test, name, log string) (string, error) {
	dir := os.Getenv(EnvDir)
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "fleetd-test-logs")
	}
	dir = filepath.Join(dir, unsafeChars.ReplaceAllString(test, "_"))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	// A test may start a process of one name twice (a restart): each gets
	// its own file.
	f, err := os.CreateTemp(dir, unsafeChars.ReplaceAllString(name, "_")+"-*.log")
	if err != nil {
		return "", err
	}
	_, err = f.WriteString(log)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return f.Name(), err
}

// lastProblems returns the last n lines of log at level WARN or ERROR (slog's
// JSON or text records) or carrying a PostgreSQL or HAProxy alert.
func lastProblems(log string, n int) []string {
	var out []string
	lines := strings.Split(log, "\n")
	for i := len(lines) - 1; i >= 0 && len(out) < n; i-- {
		if problem(lines[i]) {
			out = append(out, lines[i])
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

func problem(line string) bool {
	for _, mark := range []string{`"level":"WARN"`, `"level":"ERROR"`, "level=WARN", "level=ERROR", "[ALERT]", "[WARNING]", "FATAL:", "PANIC:"} {
		if strings.Contains(line, mark) {
			return true
		}
	}
	return strings.HasPrefix(line, "panic:") || strings.HasPrefix(line, "fatal error:")
}
