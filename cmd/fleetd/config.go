package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Config is fleetd's whole configuration. Every field is a flag and an
// environment variable (FLEETD_ + the flag name in upper snake case); a flag
// wins over its variable. Secrets also come from files (*_FILE).
type Config struct {
	HTTPAddr        string
	MQTTAddr        string
	DatabaseURL     string
	DataDir         string
	AdminToken      string
	LogLevel        slog.Level
	LogFormat       string
	PGBin           string
	ShutdownTimeout time.Duration
	Node            string
}

// setting binds one flag to its environment variable.
type setting struct {
	name  string // flag name; the variable is envName(name)
	usage string
	bind  func(fs *flag.FlagSet, name, usage string)
	// fromFile marks a secret that may instead be read from the file named by
	// -NAME-file / FLEETD_NAME_FILE.
	fromFile bool
}

func envName(flagName string) string {
	return "FLEETD_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

func (c *Config) settings() []setting {
	str := func(p *string, def string) func(*flag.FlagSet, string, string) {
		return func(fs *flag.FlagSet, n, u string) { fs.StringVar(p, n, def, u) }
	}
	host, _ := os.Hostname()
	return []setting{
		{name: "http-addr", usage: "HTTP listen address (API, console, probes, metrics)", bind: str(&c.HTTPAddr, ":8080")},
		{name: "mqtt-addr", usage: "MQTT TCP listen address; empty turns it off", bind: str(&c.MQTTAddr, ":1883")},
		{name: "database-url", usage: "PostgreSQL URL; empty starts an embedded PostgreSQL under the data dir", bind: str(&c.DatabaseURL, ""), fromFile: true},
		{name: "data-dir", usage: "directory for the embedded database, generated secrets and spooled events", bind: str(&c.DataDir, "./fleetd-data")},
		{name: "admin-token", usage: "bearer token for /api/v1; empty generates one on first start, kept in the data dir", bind: str(&c.AdminToken, ""), fromFile: true},
		{name: "log-level", usage: "log level: debug, info, warn, error", bind: func(fs *flag.FlagSet, n, u string) { fs.TextVar(&c.LogLevel, n, slog.LevelInfo, u) }},
		{name: "log-format", usage: "log format: json or text", bind: str(&c.LogFormat, "json")},
		{name: "pg-bin", usage: "directory holding the PostgreSQL server binaries for the embedded database (default: search PATH and the usual locations)", bind: str(&c.PGBin, "")},
		{name: "shutdown-timeout", usage: "how long a graceful shutdown may take before components are stopped hard", bind: func(fs *flag.FlagSet, n, u string) { fs.DurationVar(&c.ShutdownTimeout, n, 20*time.Second, u) }},
		{name: "node", usage: "name of this fleetd replica, recorded with every connection", bind: str(&c.Node, host)},
	}
}

// errHelp is returned when -h was asked for; usage has been printed.
var errHelp = errors.New("help requested")

// parseConfig reads the environment, then the flags, then the secret files,
// and validates the result. Every error names the setting (flag and variable)
// it is about.
func parseConfig(args []string, getenv func(string) string, usageOut io.Writer) (Config, error) {
	var c Config
	fs := flag.NewFlagSet("fleetd", flag.ContinueOnError)
	fs.SetOutput(usageOut)
	files := map[string]*string{}
	settings := c.settings()
	for _, s := range settings {
		s.bind(fs, s.name, s.usage+" (env "+envName(s.name)+")")
		if s.fromFile {
			p := new(string)
			files[s.name] = p
			fs.StringVar(p, s.name+"-file", "", "read "+s.name+" from this file (env "+envName(s.name+"-file")+")")
		}
	}
	// Environment first, through the flags' own parsers, so that a variable and
	// its flag accept exactly the same values.
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if v := getenv(envName(f.Name)); v != "" {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s: invalid value %q: %v", envName(f.Name), v, err))
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		return c, err
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, errHelp
		}
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q (fleetd takes only flags; see -h)", fs.Arg(0))
	}
	for _, s := range settings {
		if !s.fromFile {
			continue
		}
		path := *files[s.name]
		if path == "" {
			continue
		}
		value := fs.Lookup(s.name).Value
		if value.String() != "" {
			return c, fmt.Errorf("%s and %s are both set: use one", envName(s.name), envName(s.name+"-file"))
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return c, fmt.Errorf("%s: %w", envName(s.name+"-file"), err)
		}
		secret := strings.TrimSpace(string(data))
		if secret == "" {
			return c, fmt.Errorf("%s: file %s is empty", envName(s.name+"-file"), path)
		}
		_ = value.Set(secret)
	}
	return c, c.validate()
}

// validate checks every setting before anything starts, and reports all the
// problems at once.
func (c *Config) validate() error {
	var errs []error
	bad := func(name, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s (-%s): %s", envName(name), name, fmt.Sprintf(format, a...)))
	}
	if c.HTTPAddr == "" {
		bad("http-addr", "must not be empty")
	} else if err := checkAddr(c.HTTPAddr); err != nil {
		bad("http-addr", "%v", err)
	}
	if c.MQTTAddr != "" {
		if err := checkAddr(c.MQTTAddr); err != nil {
			bad("mqtt-addr", "%v", err)
		}
	}
	if c.DataDir == "" {
		bad("data-dir", "must not be empty")
	}
	if c.DatabaseURL != "" {
		if _, err := pgxpool.ParseConfig(c.DatabaseURL); err != nil {
			bad("database-url", "not a valid PostgreSQL connection string: %v", err)
		}
	}
	if c.AdminToken != "" && len(c.AdminToken) < 16 {
		bad("admin-token", "must be at least 16 characters (or leave it empty to have one generated)")
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		bad("log-format", "must be json or text, not %q", c.LogFormat)
	}
	if c.ShutdownTimeout <= 0 {
		bad("shutdown-timeout", "must be positive")
	}
	if c.Node == "" {
		bad("node", "must not be empty")
	}
	return errors.Join(errs...)
}

func checkAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q has no valid port", addr)
	}
	return nil
}
