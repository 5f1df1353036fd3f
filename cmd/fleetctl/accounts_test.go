package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetd/fleetd/auth"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/web"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

const bootstrap = "fleetctl-test-bootstrap-token"

// TestAccountsCommands drives fleetctl against a real API server: the
// bootstrap token (FLEETD_ADMIN_TOKEN_FILE) makes a user and an operator
// key; the key (FLEETD_API_KEY_FILE) signs fleetctl in, as an operator,
// and is refused the admin commands; the audit log shows both principals,
// and after revocation the key is refused.
func TestAccountsCommands(t *testing.T) {
	store := auth.NewStore(pgtest.New(t), auth.Options{Params: auth.Params{Memory: 64, Time: 1, Threads: 1}})
	s := web.New(web.Options{AdminToken: bootstrap})
	s.MountAccounts(store)
	srv := httptest.NewServer(s)
	defer srv.Close()
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	adminFile := write("admin-token", bootstrap+"\n")
	pwFile := write("pw", "a-good-long-password\n")
	fleetctl := func(env map[string]string, args ...string) (string, error) {
		var out, errOut bytes.Buffer
		getenv := func(k string) string {
			if k == "FLEETD_URL" {
				return srv.URL
			}
			return env[k]
		}
		err := run(context.Background(), args, &out, &errOut, getenv)
		return out.String() + errOut.String(), err
	}
	admin := map[string]string{"FLEETD_ADMIN_TOKEN_FILE": adminFile}

	if out, err := fleetctl(admin, "whoami"); err != nil || !strings.Contains(out, "bootstrap break-glass") {
		t.Fatalf("whoami with the bootstrap token: %q %v", out, err)
	}
	if out, err := fleetctl(admin, "users", "create", "erin", "-role", "operator", "-password-file", pwFile); err != nil || !strings.Contains(out, "role operator") {
		t.Fatalf("users create: %q %v", out, err)
	}
	if out, err := fleetctl(admin, "users", "set-role", "erin", "viewer"); err != nil || !strings.Contains(out, "role viewer") {
		t.Fatalf("users set-role: %q %v", out, err)
	}
	out, err := fleetctl(admin, "-output", "json", "keys", "create", "ci", "-role", "operator", "-expires-in", "30d")
	if err != nil {
		t.Fatalf("keys create: %q %v", out, err)
	}
	var key struct {
		ID    string `json:"id"`
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(out), &key); err != nil || !strings.HasPrefix(key.Token, "fk_") {
		t.Fatalf("keys create output %q: %v", out, err)
	}
	keyEnv := map[string]string{"FLEETD_API_KEY_FILE": write("key", key.Token+"\n")}
	if out, err := fleetctl(keyEnv, "whoami"); err != nil || !strings.Contains(out, "key ci") || !strings.Contains(out, "role operator") {
		t.Fatalf("whoami with the key: %q %v", out, err)
	}
	if out, err := fleetctl(map[string]string{"FLEETD_API_KEY": key.Token}, "whoami"); err != nil || !strings.Contains(out, "key ci") {
		t.Fatalf("whoami with FLEETD_API_KEY: %q %v", out, err)
	}
	if out, err := fleetctl(keyEnv, "keys", "create", "more", "-role", "viewer"); err == nil || !strings.Contains(err.Error(), "403") {
		t.Fatalf("an operator key making keys: %q %v, want 403", out, err)
	}
	if out, err := fleetctl(admin, "keys", "list"); err != nil || !strings.Contains(out, key.ID) {
		t.Fatalf("keys list: %q %v", out, err)
	}
	if out, err := fleetctl(admin, "audit", "-since", "1h", "-jsonl"); err != nil || strings.Count(out, "\n") != 4 ||
		!strings.Contains(out, `"name":"ci"`) || !strings.Contains(out, `"kind":"bootstrap"`) || strings.Contains(out, "a-good-long-password") {
		t.Fatalf("audit -jsonl: %q %v", out, err)
	}
	if out, err := fleetctl(admin, "audit", "-principal", "ci"); err != nil || !strings.Contains(out, "403") {
		t.Fatalf("audit -principal ci: %q %v", out, err)
	}
	if out, err := fleetctl(admin, "keys", "revoke", key.ID); err != nil || !strings.Contains(out, "revoked") {
		t.Fatalf("keys revoke: %q %v", out, err)
	}
	if out, err := fleetctl(keyEnv, "whoami"); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("a revoked key: %q %v, want 401", out, err)
	}
	if out, err := fleetctl(admin, "users", "delete", "erin"); err != nil {
		t.Fatalf("users delete: %q %v", out, err)
	}
	if out, err := fleetctl(admin, "users", "list"); err != nil || strings.Contains(out, "erin") {
		t.Fatalf("users list after delete: %q %v", out, err)
	}
}
