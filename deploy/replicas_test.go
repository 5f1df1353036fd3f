package deploy_test

// The replicas compose file (deploy/compose.replicas.yml) and its HAProxy
// configuration (deploy/haproxy.cfg): every replica passes the single-node
// checks, shares the database and the secrets that make the replicas one
// fleet (admin token, token pepper, firmware signing key) from the same
// secret files, has its own node name and data volume, and is reached only
// through HAProxy, which proxies MQTT in TCP mode and the API in HTTP mode to
// the replicas that pass /readyz, shutting the sessions of one that stops
// passing, and publishes its ports on loopback only.

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/haproxytest"
)

var replicasPath = filepath.Join(repoRoot, "deploy", "compose.replicas.yml")

// sharedSecrets are the settings every replica must take from the same
// secret: a replica with another pepper refuses every device token, one with
// another signing key signs jobs the devices do not trust, one with another
// admin token answers 401 to half of the operator's requests.
var sharedSecrets = []string{"FLEETD_DATABASE_URL", "FLEETD_ADMIN_TOKEN", "FLEETD_TOKEN_PEPPER", "FLEETD_FIRMWARE_SIGNING_KEY"}

// replicaSetup is the compose file with the HAProxy configuration it mounts.
type replicaSetup struct {
	compose composeFile
	haproxy []haSection
}

// replicas returns the fleetd replica services (fleetd-1, fleetd-2, ...), sorted.
func (s replicaSetup) replicas() []string {
	var names []string
	for _, name := range sortedKeys(s.compose.Services) {
		if strings.HasPrefix(name, "fleetd-") {
			names = append(names, name)
		}
	}
	return names
}

// asSingle is the compose file as the single-node checks see it: postgres
// and one replica named fleetd.
func (s replicaSetup) asSingle(replica string) composeFile {
	c := s.compose
	c.Services = map[string]service{"fleetd": s.compose.Services[replica]}
	if pg, ok := s.compose.Services["postgres"]; ok {
		c.Services["postgres"] = pg
	}
	return c
}

type replicaCheck struct {
	name  string
	check func(replicaSetup) error
}

// singleNodeChecks are the checks of docker-compose.yml that hold for the
// postgres service and for every replica. The replicas publish no port of
// their own (HAProxy does), so the check that 1883 and 8080 are published is
// left out; any port a replica does publish must still be on loopback.
func singleNodeChecks() []replicaCheck {
	var checks []replicaCheck
	for _, cc := range composeChecks {
		switch {
		case cc.name == "fleetd/publishes MQTT 1883 and HTTP 8080":
		case strings.HasPrefix(cc.name, "fleetd/"):
			checks = append(checks, replicaCheck{name: "each replica: " + strings.TrimPrefix(cc.name, "fleetd/"), check: func(s replicaSetup) error {
				var errs []error
				for _, r := range s.replicas() {
					if err := cc.check(s.asSingle(r)); err != nil {
						errs = append(errs, fmt.Errorf("replica %s: %w", r, err))
					}
				}
				return errors.Join(errs...)
			}})
		default:
			checks = append(checks, replicaCheck{name: cc.name, check: func(s replicaSetup) error { return cc.check(s.compose) }})
		}
	}
	return checks
}

var replicaChecks = []replicaCheck{
	{
		name: "replicas/at least two",
		check: func(s replicaSetup) error {
			if n := len(s.replicas()); n < 2 {
				return fmt.Errorf("%d fleetd-N service(s), want several replicas (the profile runs three)", n)
			}
			return nil
		},
	},
	{
		name: "replicas/share the database and secrets",
		check: func(s replicaSetup) error {
			var errs []error
			for _, name := range sharedSecrets {
				sources := map[string][]string{}
				for _, r := range s.replicas() {
					svc := s.compose.Services[r]
					if _, ok := svc.Environment[name]; ok {
						errs = append(errs, fmt.Errorf("service %s: %s is set in the environment; every replica must read it from the same secret file with %s_FILE", r, name, name))
						continue
					}
					src, err := secretFile(svc, r, name)
					if err != nil {
						errs = append(errs, err)
						continue
					}
					sources[src] = append(sources[src], r)
				}
				if len(sources) > 1 {
					errs = append(errs, fmt.Errorf("%s comes from different secrets %v: replicas that do not share it are not one fleet", name, sources))
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "replicas/own node name and data volume",
		check: func(s replicaSetup) error {
			var errs []error
			nodes, volumes := map[string]string{}, map[string]string{}
			for _, r := range s.replicas() {
				svc := s.compose.Services[r]
				v := svc.Environment["FLEETD_NODE"]
				switch {
				case v == nil || *v == "":
					errs = append(errs, fmt.Errorf("service %s: FLEETD_NODE is not set; the default is the container's host name, which changes with every container", r))
				case nodes[*v] != "":
					errs = append(errs, fmt.Errorf("services %s and %s share FLEETD_NODE=%s: presence could not tell which replica holds a session", nodes[*v], r, *v))
				default:
					nodes[*v] = r
				}
				for _, m := range svc.Volumes {
					if m.Target != "/var/lib/fleetd" || !isNamedVolume(m) {
						continue
					}
					if other := volumes[m.Source]; other != "" {
						errs = append(errs, fmt.Errorf("services %s and %s share the data volume %q: fleetd refuses a data dir another process uses", other, r, m.Source))
					}
					volumes[m.Source] = r
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "replicas/download URLs through the balancer",
		check: func(s replicaSetup) error {
			var errs []error
			for _, r := range s.replicas() {
				if v := s.compose.Services[r].Environment["FLEETD_PUBLIC_URL"]; v == nil || *v == "" {
					errs = append(errs, fmt.Errorf("service %s: FLEETD_PUBLIC_URL is not set; job URLs would name the replica's own container address", r))
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "replicas/per-source connect cap off behind the balancer",
		check: func(s replicaSetup) error {
			var errs []error
			for _, r := range s.replicas() {
				if v := s.compose.Services[r].Environment["FLEETD_MQTT_MAX_PENDING_CONNECTS_PER_SOURCE"]; v == nil || *v != "0" {
					errs = append(errs, fmt.Errorf("service %s: FLEETD_MQTT_MAX_PENDING_CONNECTS_PER_SOURCE is not 0; every device arrives from haproxy's address, so a reconnect storm would be cut at the per-source cap", r))
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "haproxy/publishes MQTT 1883 and HTTP 8080 on loopback",
		check: func(s replicaSetup) error {
			h, err := s.compose.service("haproxy")
			if err != nil {
				return err
			}
			var errs []error
			for _, want := range []string{"1883", "8080"} {
				i := slices.IndexFunc(h.Ports, func(p port) bool { return p.Container == want })
				switch {
				case i < 0:
					errs = append(errs, fmt.Errorf("service haproxy: container port %s is not published", want))
				case h.Ports[i].Host == "":
					errs = append(errs, fmt.Errorf("service haproxy: container port %s is published on an ephemeral host port", want))
				}
			}
			for _, p := range h.Ports {
				if p.HostIP != "127.0.0.1" && p.HostIP != "::1" && p.HostIP != "[::1]" {
					errs = append(errs, fmt.Errorf("service haproxy: port %s is published on every interface; bind it to 127.0.0.1 and expose it behind TLS on purpose", p.Container))
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "haproxy/MQTT in TCP mode to every replica, checked on /readyz, sessions shut when down",
		check: func(s replicaSetup) error {
			fe, err := haFrontend(s.haproxy, "1883")
			if err != nil {
				return err
			}
			var errs []error
			if m := haMode(s.haproxy, fe); m != "tcp" {
				errs = append(errs, fmt.Errorf("frontend %s: mode %s, want tcp: the balancer must not parse MQTT", fe.name, m))
			}
			ready := false
			for _, name := range haBackendsOf(fe) {
				be, ok := haFind(s.haproxy, "backend", name)
				if !ok {
					errs = append(errs, fmt.Errorf("frontend %s uses backend %s, which is not defined", fe.name, name))
					continue
				}
				if m := haMode(s.haproxy, be); m != "tcp" {
					errs = append(errs, fmt.Errorf("backend %s: mode %s, want tcp", name, m))
				}
				errs = append(errs, haServesReplicas(be, s.replicas(), "1883", "8080"))
				if be.checkURI() == "/readyz" {
					ready = true
					if !be.everyServer("on-marked-down", "shutdown-sessions") {
						errs = append(errs, fmt.Errorf("backend %s: no on-marked-down shutdown-sessions: devices would stay on a replica that stopped being ready", name))
					}
				}
			}
			if !ready {
				errs = append(errs, fmt.Errorf("frontend %s: no backend checks /readyz", fe.name))
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "haproxy/MQTT idle timeout above the keepalives",
		check: func(s replicaSetup) error {
			fe, err := haFrontend(s.haproxy, "1883")
			if err != nil {
				return err
			}
			// fleetd's default keepalive cap is 60 s and a session is ended
			// after 1.5 × keepalive of silence: the balancer must wait longer.
			const least = 2 * time.Minute
			var errs []error
			check := func(sec haSection, which string) {
				d, ok := haTimeout(s.haproxy, sec, which)
				if !ok || d < least {
					errs = append(errs, fmt.Errorf("%s %s: timeout %s is %v, want at least %v: the balancer would cut idle MQTT sessions before their keepalive", sec.kind, sec.name, which, d, least))
				}
			}
			check(fe, "client")
			for _, name := range haBackendsOf(fe) {
				if be, ok := haFind(s.haproxy, "backend", name); ok {
					check(be, "server")
				}
			}
			return errors.Join(errs...)
		},
	},
	{
		name: "haproxy/API in HTTP mode to every replica, checked on /readyz",
		check: func(s replicaSetup) error {
			fe, err := haFrontend(s.haproxy, "8080")
			if err != nil {
				return err
			}
			var errs []error
			if m := haMode(s.haproxy, fe); m != "http" {
				errs = append(errs, fmt.Errorf("frontend %s: mode %s, want http", fe.name, m))
			}
			for _, name := range haBackendsOf(fe) {
				be, ok := haFind(s.haproxy, "backend", name)
				if !ok {
					errs = append(errs, fmt.Errorf("frontend %s uses backend %s, which is not defined", fe.name, name))
					continue
				}
				if m := haMode(s.haproxy, be); m != "http" {
					errs = append(errs, fmt.Errorf("backend %s: mode %s, want http", name, m))
				}
				if u := be.checkURI(); u != "/readyz" {
					errs = append(errs, fmt.Errorf("backend %s: health check %q, want /readyz", name, u))
				}
				errs = append(errs, haServesReplicas(be, s.replicas(), "8080", ""))
			}
			return errors.Join(errs...)
		},
	},
}

func loadReplicaSetup(t *testing.T) (replicaSetup, string) {
	t.Helper()
	data, err := os.ReadFile(replicasPath)
	if err != nil {
		t.Fatal(err)
	}
	c, err := parseCompose(data)
	if err != nil {
		t.Fatalf("parse %s: %v", replicasPath, err)
	}
	c.dir = "deploy"
	h, err := c.service("haproxy")
	if err != nil {
		t.Fatal(err)
	}
	var cfgPath string
	for _, m := range h.Volumes {
		if m.Type == "bind" && strings.HasPrefix(m.Target, "/usr/local/etc/haproxy/") {
			cfgPath = filepath.Join(repoRoot, c.dir, m.Source)
		}
	}
	if cfgPath == "" {
		t.Fatalf("%s: service haproxy mounts no configuration at /usr/local/etc/haproxy/", replicasPath)
	}
	cfg, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatalf("service haproxy's configuration: %v", err)
	}
	return replicaSetup{compose: c, haproxy: parseHAProxy(string(cfg))}, cfgPath
}

func TestComposeReplicas(t *testing.T) {
	s, _ := loadReplicaSetup(t)
	for _, tc := range append(singleNodeChecks(), replicaChecks...) {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.check(s); err != nil {
				t.Errorf("%s: %v", replicasPath, err)
			}
		})
	}
	t.Run("every secret file is under secrets/", func(t *testing.T) {
		for name, sec := range s.compose.Secrets {
			if p := path.Clean(path.Join(s.compose.dir, sec.File)); !strings.HasPrefix(p, "secrets/") {
				t.Errorf("secret %s: file %s resolves to %s, want a file under secrets/ (git-ignored and docker-ignored)", name, sec.File, p)
			}
		}
	})
}

// TestHAProxyConfigIsValid has haproxy itself check deploy/haproxy.cfg.
func TestHAProxyConfigIsValid(t *testing.T) {
	_, cfgPath := loadReplicaSetup(t)
	out, err := exec.Command(haproxytest.Binary(t), "-c", "-f", cfgPath).CombinedOutput()
	if err != nil {
		t.Fatalf("haproxy -c -f %s: %v\n%s", cfgPath, err, out)
	}
}

// replicasFixture and haproxyFixture pass every check; each case of
// TestReplicaChecksCatchMistakes breaks one thing in one of them.
const replicasFixture = `
x-fleetd: &fleetd
  build: {context: .., dockerfile: Dockerfile}
  restart: unless-stopped
  depends_on:
    postgres:
      condition: service_healthy
  secrets: [fleetd_database_url, fleetd_admin_token, fleetd_token_pepper, fleetd_firmware_signing_key]
  healthcheck:
    test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/readyz"]
x-env: &env
  FLEETD_DATABASE_URL_FILE: /run/secrets/fleetd_database_url
  FLEETD_ADMIN_TOKEN_FILE: /run/secrets/fleetd_admin_token
  FLEETD_TOKEN_PEPPER_FILE: /run/secrets/fleetd_token_pepper
  FLEETD_FIRMWARE_SIGNING_KEY_FILE: /run/secrets/fleetd_firmware_signing_key
  FLEETD_PUBLIC_URL: http://127.0.0.1:8080
  FLEETD_MQTT_MAX_PENDING_CONNECTS_PER_SOURCE: "0"
services:
  postgres:
    image: postgres:16-alpine
    environment:
      POSTGRES_PASSWORD_FILE: /run/secrets/postgres_password
    secrets: [postgres_password]
    volumes: [pgdata:/var/lib/postgresql/data]
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U fleetd"]
  fleetd-1:
    <<: *fleetd
    environment:
      <<: *env
      FLEETD_NODE: fleetd-1
    volumes: [data-1:/var/lib/fleetd]
  fleetd-2:
    <<: *fleetd
    environment:
      <<: *env
      FLEETD_NODE: fleetd-2
    volumes: [data-2:/var/lib/fleetd]
  haproxy:
    image: haproxy:3.0-alpine
    volumes: [./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro]
    ports: ["127.0.0.1:1883:1883", "127.0.0.1:8080:8080"]
secrets:
  postgres_password: {file: ../secrets/postgres_password}
  fleetd_database_url: {file: ../secrets/fleetd_database_url}
  fleetd_admin_token: {file: ../secrets/fleetd_admin_token}
  fleetd_token_pepper: {file: ../secrets/fleetd_token_pepper}
  other_pepper: {file: ../secrets/other_pepper}
  fleetd_firmware_signing_key: {file: ../secrets/fleetd_firmware_signing_key}
volumes:
  pgdata:
  data-1:
  data-2:
`

const haproxyFixture = `
defaults
    timeout connect 2s # inline comment
frontend mqtt
    mode tcp
    bind :1883
    timeout client 15m
    use_backend ready if { nbsrv(ready) gt 0 }
    default_backend alive
backend ready
    mode tcp
    timeout server 15m
    option httpchk
    http-check send meth GET uri /readyz
    default-server inter 2s on-marked-down shutdown-sessions
    server fleetd-1 fleetd-1:1883 check port 8080
    server fleetd-2 fleetd-2:1883 check port 8080
backend alive
    mode tcp
    timeout server 15m
    option httpchk GET /healthz
    server fleetd-1 fleetd-1:1883 check port 8080
    server fleetd-2 fleetd-2:1883 check port 8080
frontend http
    mode http
    bind :8080
    default_backend api
backend api
    mode http
    option httpchk GET /readyz
    server fleetd-1 fleetd-1:8080 check
    server fleetd-2 fleetd-2:8080 check
`

func parseReplicaFixture(t *testing.T, compose, haproxy string) replicaSetup {
	t.Helper()
	c, err := parseCompose([]byte(compose))
	if err != nil {
		t.Fatalf("parse fixture: %v", err)
	}
	c.dir = "deploy"
	return replicaSetup{compose: c, haproxy: parseHAProxy(haproxy)}
}

func TestReplicaChecksCatchMistakes(t *testing.T) {
	all := append(singleNodeChecks(), replicaChecks...)
	t.Run("fixture passes", func(t *testing.T) {
		s := parseReplicaFixture(t, replicasFixture, haproxyFixture)
		for _, tc := range all {
			if err := tc.check(s); err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
		}
	})

	tests := []struct {
		name      string
		check     string // name of the check that must fail
		haproxy   bool   // break haproxyFixture instead of replicasFixture
		old, repl string
	}{
		{"one replica", "replicas/at least two", false,
			"  fleetd-2:\n", "  other:\n"},
		{"another pepper", "replicas/share the database and secrets", false,
			"      FLEETD_NODE: fleetd-2\n", "      FLEETD_NODE: fleetd-2\n      FLEETD_TOKEN_PEPPER_FILE: /run/secrets/other_pepper\n    secrets: [fleetd_database_url, fleetd_admin_token, other_pepper, fleetd_firmware_signing_key]\n"},
		{"inline signing key", "replicas/share the database and secrets", false,
			"      FLEETD_NODE: fleetd-1\n", "      FLEETD_NODE: fleetd-1\n      FLEETD_FIRMWARE_SIGNING_KEY: 00ff\n"},
		{"pepper not configured", "replicas/share the database and secrets", false,
			"  FLEETD_TOKEN_PEPPER_FILE: /run/secrets/fleetd_token_pepper\n", ""},
		{"same node name", "replicas/own node name and data volume", false,
			"FLEETD_NODE: fleetd-2", "FLEETD_NODE: fleetd-1"},
		{"no node name", "replicas/own node name and data volume", false,
			"      FLEETD_NODE: fleetd-2\n", ""},
		{"shared data volume", "replicas/own node name and data volume", false,
			"[data-2:/var/lib/fleetd]", "[data-1:/var/lib/fleetd]"},
		{"no public URL", "replicas/download URLs through the balancer", false,
			"  FLEETD_PUBLIC_URL: http://127.0.0.1:8080\n", ""},
		{"per-source cap on", "replicas/per-source connect cap off behind the balancer", false,
			`FLEETD_MQTT_MAX_PENDING_CONNECTS_PER_SOURCE: "0"`, `FLEETD_MQTT_MAX_PENDING_CONNECTS_PER_SOURCE: "1000"`},
		{"replica waits for a started postgres only", "each replica: waits for a healthy postgres", false,
			"condition: service_healthy", "condition: service_started"},
		{"replica healthcheck on /healthz", "each replica: healthcheck hits /readyz", false,
			"8080/readyz", "8080/healthz"},
		{"replica built from deploy/", "each replica: builds from the repository Dockerfile", false,
			"context: ..,", "context: .,"},
		{"replica published on every interface", "each replica: published ports are bound to loopback", false,
			"    volumes: [data-1:/var/lib/fleetd]\n", "    volumes: [data-1:/var/lib/fleetd]\n    ports: [\"1883:1883\"]\n"},
		{"haproxy on every interface", "haproxy/publishes MQTT 1883 and HTTP 8080 on loopback", false,
			`"127.0.0.1:1883:1883"`, `"1883:1883"`},
		{"haproxy without HTTP", "haproxy/publishes MQTT 1883 and HTTP 8080 on loopback", false,
			`, "127.0.0.1:8080:8080"`, ""},
		{"MQTT in http mode", "haproxy/MQTT in TCP mode to every replica, checked on /readyz, sessions shut when down", true,
			"    mode tcp\n    bind :1883", "    mode http\n    bind :1883"},
		{"replica missing from the MQTT backend", "haproxy/MQTT in TCP mode to every replica, checked on /readyz, sessions shut when down", true,
			"    server fleetd-2 fleetd-2:1883 check port 8080\nbackend alive", "backend alive"},
		{"MQTT server not checked", "haproxy/MQTT in TCP mode to every replica, checked on /readyz, sessions shut when down", true,
			"    server fleetd-1 fleetd-1:1883 check port 8080\n    server fleetd-2 fleetd-2:1883 check port 8080\nbackend alive", "    server fleetd-1 fleetd-1:1883 check port 8080\n    server fleetd-2 fleetd-2:1883\nbackend alive"},
		{"MQTT checked on the MQTT port", "haproxy/MQTT in TCP mode to every replica, checked on /readyz, sessions shut when down", true,
			"    server fleetd-1 fleetd-1:1883 check port 8080\n    server fleetd-2 fleetd-2:1883 check port 8080\nbackend alive", "    server fleetd-1 fleetd-1:1883 check\n    server fleetd-2 fleetd-2:1883 check port 8080\nbackend alive"},
		{"sessions kept on a replica marked down", "haproxy/MQTT in TCP mode to every replica, checked on /readyz, sessions shut when down", true,
			" on-marked-down shutdown-sessions", ""},
		{"MQTT checked on /healthz only", "haproxy/MQTT in TCP mode to every replica, checked on /readyz, sessions shut when down", true,
			"http-check send meth GET uri /readyz", "http-check send meth GET uri /healthz"},
		{"MQTT backend undefined", "haproxy/MQTT in TCP mode to every replica, checked on /readyz, sessions shut when down", true,
			"\nbackend alive\n", "\nbackend elsewhere\n"},
		{"no MQTT frontend", "haproxy/MQTT in TCP mode to every replica, checked on /readyz, sessions shut when down", true,
			"bind :1883", "bind :1884"},
		{"short client timeout", "haproxy/MQTT idle timeout above the keepalives", true,
			"timeout client 15m", "timeout client 30s"},
		{"no server timeout", "haproxy/MQTT idle timeout above the keepalives", true,
			"    timeout server 15m\n    option httpchk\n    http-check", "    option httpchk\n    http-check"},
		{"API in tcp mode", "haproxy/API in HTTP mode to every replica, checked on /readyz", true,
			"    mode http\n    bind :8080", "    mode tcp\n    bind :8080"},
		{"API checked on /healthz", "haproxy/API in HTTP mode to every replica, checked on /readyz", true,
			"option httpchk GET /readyz", "option httpchk GET /healthz"},
		{"replica missing from the API", "haproxy/API in HTTP mode to every replica, checked on /readyz", true,
			"    server fleetd-2 fleetd-2:8080 check\n", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			check := findCheck(t, all, tc.check, func(c replicaCheck) string { return c.name })
			compose, haproxy := replicasFixture, haproxyFixture
			if tc.haproxy {
				haproxy = replaceOnce(t, haproxy, tc.old, tc.repl)
			} else {
				compose = replaceOnce(t, compose, tc.old, tc.repl)
			}
			err := check.check(parseReplicaFixture(t, compose, haproxy))
			if err == nil {
				t.Fatalf("check %q passed a setup where %s", tc.check, tc.name)
			}
			t.Logf("rejected as expected: %v", err)
		})
	}
}

// ---------------------------------------------------------------------------
// haproxy.cfg, read as sections of directives
// ---------------------------------------------------------------------------

type haSection struct {
	kind, name string     // "frontend", "mqtt"; "defaults", ""
	lines      [][]string // directives split into words, comments dropped
}

var haKinds = []string{"global", "defaults", "frontend", "backend", "listen", "resolvers", "peers", "userlist", "program", "cache", "http-errors", "ring", "mailers"}

func parseHAProxy(text string) []haSection {
	var secs []haSection
	for _, raw := range strings.Split(text, "\n") {
		line := raw
		if i := strings.Index(line, "#"); i >= 0 {
			line = line[:i]
		}
		words := strings.Fields(line)
		if len(words) == 0 {
			continue
		}
		if raw[0] != ' ' && raw[0] != '\t' && slices.Contains(haKinds, words[0]) {
			s := haSection{kind: words[0]}
			if len(words) > 1 {
				s.name = words[1]
			}
			secs = append(secs, s)
			continue
		}
		if len(secs) > 0 {
			secs[len(secs)-1].lines = append(secs[len(secs)-1].lines, words)
		}
	}
	return secs
}

func haFind(secs []haSection, kind, name string) (haSection, bool) {
	for _, s := range secs {
		if s.kind == kind && s.name == name {
			return s, true
		}
	}
	return haSection{}, false
}

// haFrontend returns the frontend bound to port.
func haFrontend(secs []haSection, port string) (haSection, error) {
	for _, s := range secs {
		if s.kind != "frontend" && s.kind != "listen" {
			continue
		}
		for _, l := range s.lines {
			if l[0] == "bind" && len(l) > 1 && strings.HasSuffix(l[1], ":"+port) {
				return s, nil
			}
		}
	}
	return haSection{}, fmt.Errorf("haproxy.cfg: no frontend binds port %s", port)
}

// haBackendsOf returns the backends a frontend sends traffic to.
func haBackendsOf(fe haSection) []string {
	var names []string
	for _, l := range fe.lines {
		if (l[0] == "use_backend" || l[0] == "default_backend") && len(l) > 1 && !slices.Contains(names, l[1]) {
			names = append(names, l[1])
		}
	}
	return names
}

// directive returns the words after the first directive that starts with key.
func (s haSection) directive(key ...string) ([]string, bool) {
	for _, l := range s.lines {
		if len(l) >= len(key) && slices.Equal(l[:len(key)], key) {
			return l[len(key):], true
		}
	}
	return nil, false
}

// haMode is the section's mode, or the defaults' (HAProxy's own default is tcp).
func haMode(secs []haSection, s haSection) string {
	if m, ok := s.directive("mode"); ok && len(m) > 0 {
		return m[0]
	}
	if d, ok := haFind(secs, "defaults", ""); ok {
		if m, ok := d.directive("mode"); ok && len(m) > 0 {
			return m[0]
		}
	}
	return "tcp"
}

// checkURI is the path the backend's HTTP health check asks, "" when it has none.
func (s haSection) checkURI() string {
	if w, ok := s.directive("http-check", "send"); ok {
		if i := slices.Index(w, "uri"); i >= 0 && i+1 < len(w) {
			return w[i+1]
		}
	}
	if w, ok := s.directive("option", "httpchk"); ok {
		if len(w) > 0 && strings.HasPrefix(w[len(w)-1], "/") {
			return w[len(w)-1]
		}
		return "/"
	}
	return ""
}

// servers returns the backend's server lines by name, each with the
// default-server options before its own.
func (s haSection) servers() map[string][]string {
	var defaults []string
	out := map[string][]string{}
	for _, l := range s.lines {
		switch {
		case l[0] == "default-server":
			defaults = append(defaults, l[1:]...)
		case l[0] == "server" && len(l) >= 3:
			out[l[1]] = append(append([]string{l[2]}, defaults...), l[3:]...)
		}
	}
	return out
}

// everyServer reports whether every server has the option (words in a row).
func (s haSection) everyServer(words ...string) bool {
	servers := s.servers()
	for _, opts := range servers {
		if !containsRun(opts, words) {
			return false
		}
	}
	return len(servers) > 0
}

func containsRun(list, run []string) bool {
	for i := 0; i+len(run) <= len(list); i++ {
		if slices.Equal(list[i:i+len(run)], run) {
			return true
		}
	}
	return false
}

// haServesReplicas checks that the backend has a health-checked server on
// port for every replica, with its check on checkPort when that differs.
func haServesReplicas(be haSection, replicas []string, port, checkPort string) error {
	servers := be.servers()
	var errs []error
	for _, r := range replicas {
		found := false
		for name, opts := range servers {
			if opts[0] != r+":"+port {
				continue
			}
			found = true
			if !slices.Contains(opts, "check") {
				errs = append(errs, fmt.Errorf("backend %s: server %s is not health-checked (no check)", be.name, name))
			}
			if checkPort != "" && !containsRun(opts, []string{"port", checkPort}) {
				errs = append(errs, fmt.Errorf("backend %s: server %s is checked on its own port, not on the HTTP port %s where /readyz answers (add port %s)", be.name, name, checkPort, checkPort))
			}
		}
		if !found {
			errs = append(errs, fmt.Errorf("backend %s: no server for replica %s (%s:%s)", be.name, r, r, port))
		}
	}
	return errors.Join(errs...)
}

// haTimeout returns timeout which (client, server) of the section, or of the
// defaults.
func haTimeout(secs []haSection, s haSection, which string) (time.Duration, bool) {
	w, ok := s.directive("timeout", which)
	if !ok {
		if d, found := haFind(secs, "defaults", ""); found {
			w, ok = d.directive("timeout", which)
		}
	}
	if !ok || len(w) == 0 {
		return 0, false
	}
	return haDuration(w[0])
}

// haDuration reads HAProxy's time format: a number with an optional unit
// (us, ms, s, m, h, d; milliseconds by default).
func haDuration(v string) (time.Duration, bool) {
	i := strings.IndexFunc(v, func(r rune) bool { return r < '0' || r > '9' })
	num, unit := v, "ms"
	if i >= 0 {
		num, unit = v[:i], v[i:]
	}
	n, err := strconv.Atoi(num)
	if err != nil {
		return 0, false
	}
	units := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second, "m": time.Minute, "h": time.Hour, "d": 24 * time.Hour}
	u, ok := units[unit]
	return time.Duration(n) * u, ok
}
