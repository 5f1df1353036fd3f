// Package deploy_test checks the deployment files at the repository root
// (docker-compose.yml and Dockerfile) for the properties the design relies on:
// PostgreSQL is healthy before fleetd starts, data lives on named volumes,
// secrets come from files rather than inline literals, the image is a static
// multi-stage build that runs as a non-root user, and both health checks ask
// /readyz.
//
// No Docker engine is needed: the compose file is parsed with yaml.v3 and the
// Dockerfile as text. Every check is also run against small broken fixtures
// (TestComposeChecksCatchMistakes, TestDockerfileChecksCatchMistakes) so that a
// check which can no longer fail is itself a test failure.
package deploy_test

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// repoRoot is where docker-compose.yml and the Dockerfile live, relative to
// this package's directory (go test runs in it).
const repoRoot = ".."

var (
	composePath    = filepath.Join(repoRoot, "docker-compose.yml")
	dockerfilePath = filepath.Join(repoRoot, "Dockerfile")
)

// ---------------------------------------------------------------------------
// docker-compose.yml
// ---------------------------------------------------------------------------

// composeFile is the subset of the Compose specification these tests read.
// Fields that Compose accepts in a short and a long syntax have their own
// types that accept both.
type composeFile struct {
	Services map[string]service   `yaml:"services"`
	Secrets  map[string]topSecret `yaml:"secrets"`
	Volumes  map[string]any       `yaml:"volumes"` // values may be null

	// dir is the file's folder relative to the repository root ("" for the
	// root): Compose resolves relative paths (build context, secret files,
	// bind mounts) from there.
	dir string
}

type topSecret struct {
	File        string `yaml:"file"`
	Environment string `yaml:"environment"`
	External    bool   `yaml:"external"`
}

type service struct {
	Image       string       `yaml:"image"`
	Build       *build       `yaml:"build"`
	Restart     string       `yaml:"restart"`
	DependsOn   dependsOn    `yaml:"depends_on"`
	Environment environment  `yaml:"environment"`
	EnvFile     envFiles     `yaml:"env_file"`
	Ports       []port       `yaml:"ports"`
	Volumes     []mount      `yaml:"volumes"`
	Secrets     []secretRef  `yaml:"secrets"`
	Healthcheck *healthcheck `yaml:"healthcheck"`
}

// build accepts `build: ./dir` and `build: {context: ., dockerfile: ...}`.
type build struct {
	Context    string
	Dockerfile string
}

func (b *build) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		b.Context = n.Value
		return nil
	}
	var long struct {
		Context    string `yaml:"context"`
		Dockerfile string `yaml:"dockerfile"`
	}
	if err := n.Decode(&long); err != nil {
		return err
	}
	*b = build(long)
	return nil
}

// dependsOn maps a service name to its start condition. The short (list)
// syntax means service_started.
type dependsOn map[string]string

func (d *dependsOn) UnmarshalYAML(n *yaml.Node) error {
	*d = dependsOn{}
	switch n.Kind {
	case yaml.SequenceNode:
		var names []string
		if err := n.Decode(&names); err != nil {
			return err
		}
		for _, name := range names {
			(*d)[name] = "service_started"
		}
	case yaml.MappingNode:
		var long map[string]struct {
			Condition string `yaml:"condition"`
		}
		if err := n.Decode(&long); err != nil {
			return err
		}
		for name, dep := range long {
			cond := dep.Condition
			if cond == "" {
				cond = "service_started"
			}
			(*d)[name] = cond
		}
	default:
		return fmt.Errorf("line %d: depends_on must be a list or a mapping", n.Line)
	}
	return nil
}

// environment maps a variable to its value; a nil value means the variable
// is passed through from the host (`- NAME` or `NAME:` with no value).
type environment map[string]*string

func (e *environment) UnmarshalYAML(n *yaml.Node) error {
	*e = environment{}
	switch n.Kind {
	case yaml.MappingNode:
		// Merge keys (<<: *anchor, or a list of anchors) first, so that the
		// mapping's own keys win, as in Compose.
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.Tag != "!!merge" {
				continue
			}
			srcs := []*yaml.Node{v}
			if v.Kind == yaml.SequenceNode {
				srcs = v.Content
			}
			for _, src := range srcs {
				if src.Kind == yaml.AliasNode {
					src = src.Alias
				}
				var merged environment
				if err := merged.UnmarshalYAML(src); err != nil {
					return err
				}
				maps.Copy(*e, merged)
			}
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.Tag == "!!merge" {
				continue
			}
			if v.Kind != yaml.ScalarNode {
				return fmt.Errorf("line %d: environment %s: value must be a scalar", v.Line, k.Value)
			}
			if v.Tag == "!!null" {
				(*e)[k.Value] = nil
				continue
			}
			val := v.Value
			(*e)[k.Value] = &val
		}
	case yaml.SequenceNode:
		var items []string
		if err := n.Decode(&items); err != nil {
			return err
		}
		for _, item := range items {
			k, v, ok := strings.Cut(item, "=")
			if !ok {
				(*e)[k] = nil
				continue
			}
			(*e)[k] = &v
		}
	default:
		return fmt.Errorf("line %d: environment must be a mapping or a list", n.Line)
	}
	return nil
}

// envFiles accepts a path, a list of paths, or a list of {path: ...}.
type envFiles []string

func (f *envFiles) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		*f = envFiles{n.Value}
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		return fmt.Errorf("line %d: env_file must be a string or a list", n.Line)
	}
	for _, item := range n.Content {
		if item.Kind == yaml.ScalarNode {
			*f = append(*f, item.Value)
			continue
		}
		var long struct {
			Path string `yaml:"path"`
		}
		if err := item.Decode(&long); err != nil {
			return err
		}
		*f = append(*f, long.Path)
	}
	return nil
}

// port is one published port; Host is empty when Compose picks an ephemeral
// host port.
type port struct {
	HostIP    string // "" = every interface
	Host      string
	Container string
}

func (p *port) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		// [[HOST_IP:]HOST:]CONTAINER[/PROTOCOL]
		s, _, _ := strings.Cut(n.Value, "/")
		rest, container := "", s
		if i := strings.LastIndexByte(s, ':'); i >= 0 {
			rest, container = s[:i], s[i+1:]
		}
		host, ip := rest, ""
		if i := strings.LastIndexByte(rest, ':'); i >= 0 {
			ip, host = rest[:i], rest[i+1:]
		}
		*p = port{HostIP: ip, Host: host, Container: container}
		return nil
	}
	var long struct {
		Target    string `yaml:"target"`
		Published string `yaml:"published"`
		HostIP    string `yaml:"host_ip"`
	}
	if err := n.Decode(&long); err != nil {
		return err
	}
	*p = port{HostIP: long.HostIP, Host: long.Published, Container: long.Target}
	return nil
}

// mount is one entry of a service's volumes. Type is "volume" for a named or
// anonymous volume and "bind" for a host path.
type mount struct {
	Type   string
	Source string
	Target string
}

func (m *mount) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		// [SOURCE:]TARGET[:MODE]
		parts := strings.Split(n.Value, ":")
		if len(parts) == 1 {
			*m = mount{Type: "volume", Target: parts[0]}
			return nil
		}
		typ := "volume"
		if strings.HasPrefix(parts[0], "/") || strings.HasPrefix(parts[0], ".") || strings.HasPrefix(parts[0], "~") {
			typ = "bind"
		}
		*m = mount{Type: typ, Source: parts[0], Target: parts[1]}
		return nil
	}
	var long struct {
		Type   string `yaml:"type"`
		Source string `yaml:"source"`
		Target string `yaml:"target"`
	}
	if err := n.Decode(&long); err != nil {
		return err
	}
	*m = mount(long)
	return nil
}

// secretRef is one entry of a service's secrets.
type secretRef struct {
	Source string
	Target string
}

func (s *secretRef) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		*s = secretRef{Source: n.Value}
		return nil
	}
	var long struct {
		Source string `yaml:"source"`
		Target string `yaml:"target"`
	}
	if err := n.Decode(&long); err != nil {
		return err
	}
	*s = secretRef(long)
	return nil
}

// path is where the secret appears inside the container.
func (s secretRef) path() string {
	switch {
	case s.Target == "":
		return "/run/secrets/" + s.Source
	case strings.HasPrefix(s.Target, "/"):
		return s.Target
	default:
		return "/run/secrets/" + s.Target
	}
}

type healthcheck struct {
	Test    yaml.Node `yaml:"test"`
	Disable bool      `yaml:"disable"`
}

// command returns the health check command as one string, and false when the
// check is missing or disabled.
func (h *healthcheck) command() (string, bool) {
	if h == nil || h.Disable {
		return "", false
	}
	switch h.Test.Kind {
	case yaml.ScalarNode:
		return h.Test.Value, h.Test.Value != ""
	case yaml.SequenceNode:
		var words []string
		if err := h.Test.Decode(&words); err != nil || len(words) == 0 || words[0] == "NONE" {
			return "", false
		}
		if words[0] == "CMD" || words[0] == "CMD-SHELL" {
			words = words[1:]
		}
		return strings.Join(words, " "), len(words) > 0
	}
	return "", false
}

func parseCompose(data []byte) (composeFile, error) {
	var c composeFile
	if err := yaml.Unmarshal(data, &c); err != nil {
		return composeFile{}, err
	}
	if len(c.Services) == 0 {
		return composeFile{}, errors.New("no services")
	}
	return c, nil
}

func (c composeFile) service(name string) (service, error) {
	s, ok := c.Services[name]
	if !ok {
		return service{}, fmt.Errorf("no service %q (services: %s)", name, strings.Join(sortedKeys(c.Services), ", "))
	}
	return s, nil
}

// secretFile checks that the service sets env var name+"_FILE" to the path of
// a secret the service mounts, and returns that secret's name.
func secretFile(s service, svcName, name string) (string, error) {
	v := s.Environment[name+"_FILE"]
	if v == nil || *v == "" {
		return "", fmt.Errorf("service %s: %s_FILE is not set", svcName, name)
	}
	for _, ref := range s.Secrets {
		if ref.path() == *v {
			return ref.Source, nil
		}
	}
	var mounted []string
	for _, ref := range s.Secrets {
		mounted = append(mounted, ref.path())
	}
	return "", fmt.Errorf("service %s: %s_FILE=%s is not one of the service's secrets (mounted: [%s]); add the secret under services.%s.secrets",
		svcName, name, *v, strings.Join(mounted, " "), svcName)
}

// interpolation matches a value that is entirely one ${VAR...} reference, so
// the value comes from the host's environment or .env rather than the file.
var interpolation = regexp.MustCompile(`^\$\{[A-Za-z_][A-Za-z0-9_]*([:?+-][^}]*)?\}$`)

func isNamedVolume(m mount) bool {
	return (m.Type == "volume" || m.Type == "") && m.Source != ""
}

type composeCheck struct {
	name  string
	check func(composeFile) error
}

// composeChecks are the properties docker-compose.yml must have.
var composeChecks = []composeCheck{
	{
		name: "postgres/data on a declared named volume",
		check: func(c composeFile) error {
			pg, err := c.service("postgres")
			if err != nil {
				return err
			}
			for _, m := range pg.Volumes {
				if m.Target != "/var/lib/postgresql/data" && m.Target != "/var/lib/postgresql" {
					continue
				}
				if !isNamedVolume(m) {
					return fmt.Errorf("service postgres: %s is a %s mount of %q, want a named volume", m.Target, m.Type, m.Source)
				}
				if _, ok := c.Volumes[m.Source]; !ok {
					return fmt.Errorf("service postgres: volume %q is not declared under the top-level volumes:", m.Source)
				}
				return nil
			}
			return errors.New("service postgres: nothing is mounted at /var/lib/postgresql/data; the database would live in the container")
		},
	},
	{
		name: "postgres/healthcheck uses pg_isready",
		check: func(c composeFile) error {
			pg, err := c.service("postgres")
			if err != nil {
				return err
			}
			cmd, ok := pg.Healthcheck.command()
			if !ok {
				return errors.New("service postgres: no healthcheck (fleetd's depends_on condition service_healthy needs one)")
			}
			if !strings.Contains(cmd, "pg_isready") {
				return fmt.Errorf("service postgres: healthcheck %q does not run pg_isready", cmd)
			}
			return nil
		},
	},
	{
		name: "postgres/password from a secret",
		check: func(c composeFile) error {
			pg, err := c.service("postgres")
			if err != nil {
				return err
			}
			if _, ok := pg.Environment["POSTGRES_PASSWORD"]; ok {
				return errors.New("service postgres: POSTGRES_PASSWORD is set in the environment; use POSTGRES_PASSWORD_FILE with a secret")
			}
			_, err = secretFile(pg, "postgres", "POSTGRES_PASSWORD")
			return err
		},
	},
	{
		name: "fleetd/builds from the repository Dockerfile",
		check: func(c composeFile) error {
			f, err := c.service("fleetd")
			if err != nil {
				return err
			}
			if f.Build == nil {
				return errors.New("service fleetd: no build: section; want build: {context: ., dockerfile: Dockerfile}")
			}
			ctx := f.Build.Context
			if ctx == "" {
				ctx = "."
			}
			if path.Clean(path.Join(c.dir, ctx)) != "." {
				root := "."
				if c.dir != "" {
					root = path.Join(strings.Repeat("../", strings.Count(path.Clean(c.dir), "/")+1))
				}
				return fmt.Errorf("service fleetd: build context is %q, want the repository root %q", f.Build.Context, root)
			}
			df := f.Build.Dockerfile
			if df == "" {
				df = "Dockerfile"
			}
			if _, err := os.Stat(filepath.Join(repoRoot, c.dir, ctx, df)); err != nil {
				return fmt.Errorf("service fleetd: build dockerfile %q: %w", df, err)
			}
			return nil
		},
	},
	{
		name: "fleetd/waits for a healthy postgres",
		check: func(c composeFile) error {
			f, err := c.service("fleetd")
			if err != nil {
				return err
			}
			cond, ok := f.DependsOn["postgres"]
			if !ok {
				return errors.New("service fleetd: depends_on does not list postgres")
			}
			if cond != "service_healthy" {
				return fmt.Errorf("service fleetd: depends_on postgres has condition %s, want service_healthy (long form: depends_on: {postgres: {condition: service_healthy}})", cond)
			}
			return nil
		},
	},
	{
		name: "fleetd/database URL configured",
		check: func(c composeFile) error {
			f, err := c.service("fleetd")
			if err != nil {
				return err
			}
			if _, ok := f.Environment["FLEETD_DATABASE_URL_FILE"]; ok {
				_, err := secretFile(f, "fleetd", "FLEETD_DATABASE_URL")
				return err
			}
			if _, ok := f.Environment["FLEETD_DATABASE_URL"]; ok {
				return nil
			}
			return errors.New("service fleetd: neither FLEETD_DATABASE_URL_FILE nor FLEETD_DATABASE_URL is set; fleetd would start its own private PostgreSQL instead of using the postgres service")
		},
	},
	{
		name: "fleetd/publishes MQTT 1883 and HTTP 8080",
		check: func(c composeFile) error {
			f, err := c.service("fleetd")
			if err != nil {
				return err
			}
			var errs []error
			for _, want := range []string{"1883", "8080"} {
				i := slices.IndexFunc(f.Ports, func(p port) bool { return p.Container == want })
				switch {
				case i < 0:
					errs = append(errs, fmt.Errorf("service fleetd: container port %s is not published", want))
				case f.Ports[i].Host == "":
					errs = append(errs, fmt.Errorf("service fleetd: container port %s is published on an ephemeral host port; give it a fixed one", want))
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "fleetd/published ports are bound to loopback",
		check: func(c composeFile) error {
			f, err := c.service("fleetd")
			if err != nil {
				return err
			}
			var errs []error
			for _, p := range f.Ports {
				if p.HostIP != "127.0.0.1" && p.HostIP != "[::1]" && p.HostIP != "::1" {
					errs = append(errs, fmt.Errorf("service fleetd: port %s is published on every interface; bind it to 127.0.0.1 and expose it behind TLS on purpose", p.Container))
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "fleetd/healthcheck hits /readyz",
		check: func(c composeFile) error {
			f, err := c.service("fleetd")
			if err != nil {
				return err
			}
			cmd, ok := f.Healthcheck.command()
			if !ok {
				return errors.New("service fleetd: no healthcheck")
			}
			if !strings.Contains(cmd, "/readyz") {
				return fmt.Errorf("service fleetd: healthcheck %q does not ask /readyz", cmd)
			}
			return nil
		},
	},
	{
		name: "fleetd/restart policy",
		check: func(c composeFile) error {
			f, err := c.service("fleetd")
			if err != nil {
				return err
			}
			switch r := f.Restart; {
			case r == "always", r == "unless-stopped", r == "on-failure", strings.HasPrefix(r, "on-failure:"):
				return nil
			case r == "" || r == "no":
				return errors.New("service fleetd: no restart policy; want restart: unless-stopped")
			default:
				return fmt.Errorf("service fleetd: unknown restart policy %q", r)
			}
		},
	},
	{
		name: "fleetd/admin token not inline",
		check: func(c composeFile) error {
			f, err := c.service("fleetd")
			if err != nil {
				return err
			}
			if _, ok := f.Environment["FLEETD_ADMIN_TOKEN_FILE"]; ok {
				if _, ok := f.Environment["FLEETD_ADMIN_TOKEN"]; ok {
					return errors.New("service fleetd: both FLEETD_ADMIN_TOKEN and FLEETD_ADMIN_TOKEN_FILE are set")
				}
				_, err := secretFile(f, "fleetd", "FLEETD_ADMIN_TOKEN")
				return err
			}
			if v, ok := f.Environment["FLEETD_ADMIN_TOKEN"]; ok {
				if v == nil || interpolation.MatchString(*v) {
					return nil // taken from the host environment or .env
				}
				return errors.New("service fleetd: FLEETD_ADMIN_TOKEN is an inline literal; use FLEETD_ADMIN_TOKEN_FILE with a secret, or env_file")
			}
			if len(f.EnvFile) > 0 {
				return nil
			}
			return errors.New("service fleetd: no admin token: set FLEETD_ADMIN_TOKEN_FILE to a secret, or use env_file")
		},
	},
	{
		name: "fleetd/data dir on a declared named volume",
		check: func(c composeFile) error {
			f, err := c.service("fleetd")
			if err != nil {
				return err
			}
			for _, m := range f.Volumes {
				if m.Target != "/var/lib/fleetd" {
					continue
				}
				if !isNamedVolume(m) {
					return fmt.Errorf("service fleetd: /var/lib/fleetd is a %s mount of %q, want a named volume (a bind mount must be writable by uid 10001)", m.Type, m.Source)
				}
				if _, ok := c.Volumes[m.Source]; !ok {
					return fmt.Errorf("service fleetd: volume %q is not declared under the top-level volumes:", m.Source)
				}
				return nil
			}
			return errors.New("service fleetd: nothing is mounted at /var/lib/fleetd (FLEETD_DATA_DIR)")
		},
	},
	{
		name: "every named volume is declared",
		check: func(c composeFile) error {
			var errs []error
			for _, name := range sortedKeys(c.Services) {
				for _, m := range c.Services[name].Volumes {
					if !isNamedVolume(m) {
						continue
					}
					if _, ok := c.Volumes[m.Source]; !ok {
						errs = append(errs, fmt.Errorf("service %s: volume %q is not declared under the top-level volumes:", name, m.Source))
					}
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "every secret is declared with a file",
		check: func(c composeFile) error {
			var errs []error
			for _, name := range sortedKeys(c.Services) {
				for _, ref := range c.Services[name].Secrets {
					top, ok := c.Secrets[ref.Source]
					switch {
					case !ok:
						errs = append(errs, fmt.Errorf("service %s: secret %q is not declared under the top-level secrets:", name, ref.Source))
					case top.File == "":
						errs = append(errs, fmt.Errorf("secret %q has no file: (want file: ./secrets/%s)", ref.Source, ref.Source))
					}
				}
			}
			return errors.Join(errs...)
		},
	},
}

func TestCompose(t *testing.T) {
	data, err := os.ReadFile(composePath)
	if err != nil {
		t.Fatal(err)
	}
	c, err := parseCompose(data)
	if err != nil {
		t.Fatalf("parse %s: %v", composePath, err)
	}
	for _, tc := range composeChecks {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.check(c); err != nil {
				t.Errorf("%s: %v", composePath, err)
			}
		})
	}
}

// composeFixture is a minimal compose file that passes every check; each
// case of TestComposeChecksCatchMistakes breaks one thing in it.
const composeFixture = `
services:
  postgres:
    image: postgres:16-alpine
    restart: unless-stopped
    environment:
      POSTGRES_USER: fleetd
      POSTGRES_DB: fleetd
      POSTGRES_PASSWORD_FILE: /run/secrets/postgres_password
    secrets: [postgres_password]
    volumes:
      - pgdata:/var/lib/postgresql/data
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U fleetd -d fleetd"]
      interval: 5s
  fleetd:
    build:
      context: .
      dockerfile: Dockerfile
    restart: unless-stopped
    depends_on:
      postgres:
        condition: service_healthy
    environment:
      FLEETD_DATABASE_URL_FILE: /run/secrets/fleetd_database_url
      FLEETD_ADMIN_TOKEN_FILE: /run/secrets/fleetd_admin_token
    secrets:
      - fleetd_database_url
      - source: fleetd_admin_token
    ports:
      - "127.0.0.1:1883:1883"
      - "127.0.0.1:8080:8080/tcp"
    volumes:
      - fleetd-data:/var/lib/fleetd
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/readyz"]
secrets:
  postgres_password:
    file: ./secrets/postgres_password
  fleetd_database_url:
    file: ./secrets/fleetd_database_url
  fleetd_admin_token:
    file: ./secrets/fleetd_admin_token
volumes:
  pgdata:
  fleetd-data:
`

func TestComposeChecksCatchMistakes(t *testing.T) {
	t.Run("fixture passes", func(t *testing.T) {
		c, err := parseCompose([]byte(composeFixture))
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range composeChecks {
			if err := tc.check(c); err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
		}
	})

	tests := []struct {
		name      string
		check     string // name of the check in composeChecks that must fail
		old, repl string // old is replaced once in composeFixture
	}{
		{"postgres bind mount", "postgres/data on a declared named volume",
			"- pgdata:/var/lib/postgresql/data", "- ./pgdata:/var/lib/postgresql/data"},
		{"postgres volume undeclared", "postgres/data on a declared named volume",
			"- pgdata:/var/lib/postgresql/data", "- pg:/var/lib/postgresql/data"},
		{"postgres no data volume", "postgres/data on a declared named volume",
			"- pgdata:/var/lib/postgresql/data", "- pgdata:/srv"},
		{"postgres healthcheck without pg_isready", "postgres/healthcheck uses pg_isready",
			`"pg_isready -U fleetd -d fleetd"`, `"true"`},
		{"postgres healthcheck disabled", "postgres/healthcheck uses pg_isready",
			"      interval: 5s\n", "      disable: true\n"},
		{"postgres literal password", "postgres/password from a secret",
			"POSTGRES_PASSWORD_FILE: /run/secrets/postgres_password", "POSTGRES_PASSWORD: hunter2"},
		{"postgres password file not mounted", "postgres/password from a secret",
			"secrets: [postgres_password]", "secrets: []"},
		{"fleetd image only", "fleetd/builds from the repository Dockerfile",
			"    build:\n      context: .\n      dockerfile: Dockerfile\n", "    image: fleetd:latest\n"},
		{"fleetd other context", "fleetd/builds from the repository Dockerfile",
			"context: .", "context: ./cmd"},
		{"fleetd missing Dockerfile", "fleetd/builds from the repository Dockerfile",
			"dockerfile: Dockerfile", "dockerfile: Dockerfile.missing"},
		{"depends_on short form", "fleetd/waits for a healthy postgres",
			"    depends_on:\n      postgres:\n        condition: service_healthy\n", "    depends_on: [postgres]\n"},
		{"depends_on service_started", "fleetd/waits for a healthy postgres",
			"condition: service_healthy", "condition: service_started"},
		{"no database URL", "fleetd/database URL configured",
			"      FLEETD_DATABASE_URL_FILE: /run/secrets/fleetd_database_url\n", ""},
		{"database URL file not a secret", "fleetd/database URL configured",
			"FLEETD_DATABASE_URL_FILE: /run/secrets/fleetd_database_url", "FLEETD_DATABASE_URL_FILE: /etc/fleetd/db"},
		{"port 8080 missing", "fleetd/publishes MQTT 1883 and HTTP 8080",
			`      - "127.0.0.1:8080:8080/tcp"` + "\n", ""},
		{"port 1883 ephemeral", "fleetd/publishes MQTT 1883 and HTTP 8080",
			`"127.0.0.1:1883:1883"`, `"1883"`},
		{"port 1883 on every interface", "fleetd/published ports are bound to loopback",
			`"127.0.0.1:1883:1883"`, `"1883:1883"`},
		{"port 8080 on every interface, long form", "fleetd/published ports are bound to loopback",
			`      - "127.0.0.1:8080:8080/tcp"`, "      - target: 8080\n        published: 8080"},
		{"healthcheck on /healthz", "fleetd/healthcheck hits /readyz",
			"http://127.0.0.1:8080/readyz", "http://127.0.0.1:8080/healthz"},
		{"no restart policy", "fleetd/restart policy",
			"    restart: unless-stopped\n    depends_on:", "    depends_on:"},
		{"restart no", "fleetd/restart policy",
			"    restart: unless-stopped\n    depends_on:", "    restart: \"no\"\n    depends_on:"},
		{"inline admin token", "fleetd/admin token not inline",
			"FLEETD_ADMIN_TOKEN_FILE: /run/secrets/fleetd_admin_token", "FLEETD_ADMIN_TOKEN: s3cr3t"},
		{"no admin token", "fleetd/admin token not inline",
			"      FLEETD_ADMIN_TOKEN_FILE: /run/secrets/fleetd_admin_token\n", ""},
		{"admin token file not mounted", "fleetd/admin token not inline",
			"      - source: fleetd_admin_token\n", ""},
		{"fleetd data bind mount", "fleetd/data dir on a declared named volume",
			"- fleetd-data:/var/lib/fleetd", "- ./fleetd-data:/var/lib/fleetd"},
		{"volume undeclared", "every named volume is declared",
			"  pgdata:\n  fleetd-data:\n", "  pgdata:\n"},
		{"secret without file", "every secret is declared with a file",
			"    file: ./secrets/fleetd_admin_token", "    environment: FLEETD_ADMIN_TOKEN"},
		{"secret undeclared", "every secret is declared with a file",
			"  fleetd_database_url:\n    file: ./secrets/fleetd_database_url\n", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			check := findCheck(t, composeChecks, tc.check, func(c composeCheck) string { return c.name })
			broken := replaceOnce(t, composeFixture, tc.old, tc.repl)
			c, err := parseCompose([]byte(broken))
			if err != nil {
				t.Fatalf("parse broken fixture: %v", err)
			}
			err = check.check(c)
			if err == nil {
				t.Fatalf("check %q passed a compose file where %s", tc.check, tc.name)
			}
			t.Logf("rejected as expected: %v", err)
		})
	}
}

// ---------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------

type instruction struct {
	line int    // first line, 1-based
	cmd  string // upper case: FROM, RUN, ...
	args string
}

type stage struct {
	from         string
	instructions []instruction
}

// parseDockerfile splits a Dockerfile into build stages. It joins backslash
// continuations and drops comments; heredocs are not supported.
func parseDockerfile(text string) ([]stage, error) {
	var (
		stages  []stage
		cur     strings.Builder
		curLine int
	)
	emit := func() error {
		s := strings.TrimSpace(cur.String())
		cur.Reset()
		if s == "" {
			return nil
		}
		cmd, args, _ := strings.Cut(s, " ")
		// Whitespace is collapsed so that joined continuations read well in
		// failure messages; the checks only match words.
		in := instruction{line: curLine, cmd: strings.ToUpper(cmd), args: strings.Join(strings.Fields(args), " ")}
		if in.cmd == "FROM" {
			stages = append(stages, stage{from: in.args})
			return nil
		}
		if len(stages) == 0 {
			if in.cmd == "ARG" {
				return nil // global build argument
			}
			return fmt.Errorf("line %d: %s before the first FROM", in.line, in.cmd)
		}
		last := &stages[len(stages)-1]
		last.instructions = append(last.instructions, in)
		return nil
	}
	for i, raw := range strings.Split(text, "\n") {
		line := strings.TrimRight(raw, " \t\r")
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		if cur.Len() == 0 {
			curLine = i + 1
		}
		if body, ok := strings.CutSuffix(line, `\`); ok {
			cur.WriteString(body)
			cur.WriteString(" ")
			continue
		}
		cur.WriteString(line)
		if err := emit(); err != nil {
			return nil, err
		}
	}
	if err := emit(); err != nil {
		return nil, err
	}
	if len(stages) == 0 {
		return nil, errors.New("no FROM instruction")
	}
	return stages, nil
}

// last returns the last instruction cmd in the stage.
func (s stage) last(cmd string) (instruction, bool) {
	for i := len(s.instructions) - 1; i >= 0; i-- {
		if s.instructions[i].cmd == cmd {
			return s.instructions[i], true
		}
	}
	return instruction{}, false
}

var (
	goBuild = regexp.MustCompile(`\bgo\s+build\b`)
	cgoOff  = regexp.MustCompile(`\bCGO_ENABLED(=|\s+)["']?0["']?(\s|;|&|$)`)
)

type dockerfileCheck struct {
	name  string
	check func([]stage) error
}

// dockerfileChecks are the properties the Dockerfile must have.
var dockerfileChecks = []dockerfileCheck{
	{
		name: "multi-stage build",
		check: func(stages []stage) error {
			if len(stages) < 2 {
				return fmt.Errorf("%d FROM stage(s), want a build stage and a runtime stage", len(stages))
			}
			return nil
		},
	},
	{
		name: "static CGO-free go build in a build stage",
		check: func(stages []stage) error {
			var errs []error
			found := false
			for si, s := range stages {
				cgoSet := false // by ENV or ARG earlier in the stage
				for _, in := range s.instructions {
					if (in.cmd == "ENV" || in.cmd == "ARG") && cgoOff.MatchString(in.args) {
						cgoSet = true
					}
					if in.cmd != "RUN" || !goBuild.MatchString(in.args) {
						continue
					}
					found = true
					if si == len(stages)-1 {
						errs = append(errs, fmt.Errorf("line %d: go build runs in the final stage; the runtime image would carry the Go toolchain", in.line))
					}
					if !cgoSet && !cgoOff.MatchString(in.args) {
						errs = append(errs, fmt.Errorf("line %d: go build without CGO_ENABLED=0; the binary would need libc from the build image", in.line))
					}
				}
			}
			if !found {
				return errors.New("no RUN ... go build")
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "final stage runs as non-root",
		check: func(stages []stage) error {
			final := stages[len(stages)-1]
			in, ok := final.last("USER")
			if !ok {
				return fmt.Errorf("final stage (FROM %s) has no USER; the container would run as root", final.from)
			}
			user, _, _ := strings.Cut(in.args, ":")
			if user == "" || user == "root" || user == "0" {
				return fmt.Errorf("line %d: USER %s is root", in.line, in.args)
			}
			return nil
		},
	},
	{
		name: "final stage exposes 1883 and 8080",
		check: func(stages []stage) error {
			exposed := map[string]bool{}
			for _, in := range stages[len(stages)-1].instructions {
				if in.cmd != "EXPOSE" {
					continue
				}
				for _, p := range strings.Fields(in.args) {
					p, _, _ = strings.Cut(p, "/")
					exposed[p] = true
				}
			}
			var errs []error
			for _, want := range []string{"1883", "8080"} {
				if !exposed[want] {
					errs = append(errs, fmt.Errorf("final stage does not EXPOSE %s", want))
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "final stage healthcheck hits /readyz",
		check: func(stages []stage) error {
			in, ok := stages[len(stages)-1].last("HEALTHCHECK")
			if !ok {
				return errors.New("final stage has no HEALTHCHECK")
			}
			if f := strings.Fields(in.args); len(f) == 0 || strings.EqualFold(f[0], "NONE") {
				return fmt.Errorf("line %d: HEALTHCHECK NONE", in.line)
			}
			if !strings.Contains(in.args, "/readyz") {
				return fmt.Errorf("line %d: HEALTHCHECK %s does not ask /readyz", in.line, in.args)
			}
			return nil
		},
	},
}

func TestDockerfile(t *testing.T) {
	data, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	stages, err := parseDockerfile(string(data))
	if err != nil {
		t.Fatalf("parse %s: %v", dockerfilePath, err)
	}
	for _, tc := range dockerfileChecks {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.check(stages); err != nil {
				t.Errorf("%s: %v", dockerfilePath, err)
			}
		})
	}
}

// dockerfileFixture passes every check; each case of
// TestDockerfileChecksCatchMistakes breaks one thing in it.
const dockerfileFixture = `# syntax=docker/dockerfile:1
ARG GO_VERSION=1.26
FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath \
    # a comment inside a continuation
    -ldflags='-s -w' -o /out/fleetd ./cmd/fleetd

FROM alpine:3.20
RUN adduser -D -u 10001 fleetd
COPY --from=build /out/fleetd /usr/local/bin/fleetd
EXPOSE 1883/tcp 8080
USER fleetd:fleetd
HEALTHCHECK --interval=15s CMD wget -q -O /dev/null http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["/usr/local/bin/fleetd"]
`

func TestDockerfileChecksCatchMistakes(t *testing.T) {
	t.Run("fixture passes", func(t *testing.T) {
		stages, err := parseDockerfile(dockerfileFixture)
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range dockerfileChecks {
			if err := tc.check(stages); err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
		}
	})

	tests := []struct {
		name      string
		check     string // name of the check in dockerfileChecks that must fail
		old, repl string // old is replaced once in dockerfileFixture
	}{
		{"single stage", "multi-stage build",
			"FROM alpine:3.20\n", ""},
		{"cgo left on", "static CGO-free go build in a build stage",
			"RUN CGO_ENABLED=0 go build", "RUN go build"},
		{"cgo enabled", "static CGO-free go build in a build stage",
			"RUN CGO_ENABLED=0 go build", "RUN CGO_ENABLED=1 go build"},
		{"build in final stage", "static CGO-free go build in a build stage",
			"RUN adduser", "RUN CGO_ENABLED=0 go build ./cmd/fleetctl && adduser"},
		{"no user", "final stage runs as non-root",
			"USER fleetd:fleetd\n", ""},
		{"user root", "final stage runs as non-root",
			"USER fleetd:fleetd", "USER root"},
		{"user 0", "final stage runs as non-root",
			"USER fleetd:fleetd", "USER 0:0"},
		{"only 1883 exposed", "final stage exposes 1883 and 8080",
			"EXPOSE 1883/tcp 8080", "EXPOSE 1883/tcp"},
		{"healthcheck none", "final stage healthcheck hits /readyz",
			"HEALTHCHECK --interval=15s CMD", "HEALTHCHECK NONE\n#"},
		{"healthcheck on /healthz", "final stage healthcheck hits /readyz",
			"8080/readyz", "8080/healthz"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			check := findCheck(t, dockerfileChecks, tc.check, func(c dockerfileCheck) string { return c.name })
			broken := replaceOnce(t, dockerfileFixture, tc.old, tc.repl)
			stages, err := parseDockerfile(broken)
			if err != nil {
				t.Fatalf("parse broken fixture: %v", err)
			}
			err = check.check(stages)
			if err == nil {
				t.Fatalf("check %q passed a Dockerfile where %s", tc.check, tc.name)
			}
			t.Logf("rejected as expected: %v", err)
		})
	}
}

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

func findCheck[C any](t *testing.T, checks []C, name string, nameOf func(C) string) C {
	t.Helper()
	for _, c := range checks {
		if nameOf(c) == name {
			return c
		}
	}
	t.Fatalf("no check named %q", name)
	var zero C
	return zero
}

func replaceOnce(t *testing.T, s, old, repl string) string {
	t.Helper()
	if n := strings.Count(s, old); n != 1 {
		t.Fatalf("fixture contains %q %d times, want exactly once", old, n)
	}
	return strings.Replace(s, old, repl, 1)
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
