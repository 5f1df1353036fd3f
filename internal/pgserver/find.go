// Package pgserver runs and supervises a private PostgreSQL cluster from the
// server binaries installed on the machine. fleetd uses it when no database URL
// is configured, and the test harness (internal/pgtest) uses the same code, so
// the embedded mode is exercised by every test run.
package pgserver

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// ErrNoBinaries is returned by FindBinDir when no directory holds both initdb
// and postgres. Its text names the ways out, because the operator reading it
// has to pick one.
var ErrNoBinaries = errors.New("no PostgreSQL server binaries (initdb, postgres) found in FLEETD_PG_BIN, PATH, " +
	"/usr/lib/postgresql/*/bin, /usr/pgsql-*/bin or the Homebrew prefixes: install PostgreSQL " +
	"(Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql@16), " +
	"set FLEETD_PG_BIN to the directory holding initdb and postgres, " +
	"set FLEETD_DATABASE_URL to use an existing server, or run `docker compose up`")

// searchGlobs are the places PostgreSQL packages put their server binaries,
// newest major version first after sorting.
var searchGlobs = []string{
	"/usr/lib/postgresql/*/bin",          // Debian, Ubuntu
	"/usr/pgsql-*/bin",                   // RHEL, Fedora (PGDG)
	"/opt/homebrew/opt/postgresql@*/bin", // Homebrew, Apple silicon
	"/usr/local/opt/postgresql@*/bin",    // Homebrew, Intel
	"/opt/homebrew/opt/postgresql/bin",   // Homebrew, unversioned
	"/usr/local/opt/postgresql/bin",      // Homebrew, unversioned
	"/Applications/Postgres.app/Contents/Versions/latest/bin",
	"/usr/local/pgsql/bin", // built from source
}

// FindBinDir returns the directory holding initdb and postgres. override (the
// FLEETD_PG_BIN setting) wins when set and must be right; otherwise PATH is
// searched, then the usual install locations, newest version first.
func FindBinDir(override string) (string, error) {
	if override != "" {
		if !hasServerBinaries(override) {
			return "", fmt.Errorf("FLEETD_PG_BIN=%s does not hold both initdb and postgres", override)
		}
		return override, nil
	}
	if p, err := exec.LookPath("postgres"); err == nil {
		if dir := filepath.Dir(p); hasServerBinaries(dir) {
			return dir, nil
		}
	}
	for _, pattern := range searchGlobs {
		dirs, _ := filepath.Glob(pattern)
		sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
		for _, dir := range dirs {
			if hasServerBinaries(dir) {
				return dir, nil
			}
		}
	}
	return "", ErrNoBinaries
}

func hasServerBinaries(dir string) bool {
	for _, name := range []string{"initdb", "postgres"} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// versionOf extracts the major version from paths such as
// /usr/lib/postgresql/15/bin or /opt/homebrew/opt/postgresql@16/bin, so that
// the newest installed server is preferred. Unversioned paths sort last.
func versionOf(dir string) float64 {
	for _, part := range strings.FieldsFunc(dir, func(r rune) bool { return r == '/' || r == '@' || r == '-' }) {
		if v, err := strconv.ParseFloat(part, 64); err == nil {
			return v
		}
	}
	return -1
}
