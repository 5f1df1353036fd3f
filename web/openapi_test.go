package web

import (
	"encoding/json"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/go-chi/chi/v5"
	"github.com/google/go-cmp/cmp"

	"github.com/fleetd/fleetd/auth"
)

// TestOpenAPICoversEveryRoute walks the router with every component mounted
// and checks that each /api/v1 route and method is documented, and that the
// document describes nothing the server does not serve.
func TestOpenAPICoversEveryRoute(t *testing.T) {
	s := New(Options{AdminToken: token})
	mountAll(s, auth.NewStore(nil, auth.Options{Params: cheap}))

	param := regexp.MustCompile(`\{(\w+):[^}]*\}`)
	served := map[string]bool{}
	err := chi.Walk(s.router.Load(), func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		route = strings.TrimSuffix(route, "/")
		if rest, ok := strings.CutPrefix(route, "/api/v1"); ok && rest != "" {
			served[strings.ToLower(method)+" "+param.ReplaceAllString(rest, "{$1}")] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Paths map[string]map[string]json.RawMessage
	}
	if err := json.Unmarshal(openAPI, &doc); err != nil {
		t.Fatalf("openapi.json is not JSON: %v", err)
	}
	documented := map[string]bool{}
	for path, ops := range doc.Paths {
		for method := range ops {
			documented[method+" "+path] = true
		}
	}
	keys := func(m map[string]bool) []string {
		var out []string
		for k := range m {
			out = append(out, k)
		}
		sort.Strings(out)
		return out
	}
	if diff := cmp.Diff(keys(served), keys(documented)); diff != "" {
		t.Fatalf("routes served (-) and documented (+) differ:\n%s", diff)
	}
	rec, body := do(t, s, http.MethodGet, "/api/v1/openapi.json", nil)
	if rec.Code != http.StatusOK || body["openapi"] != "3.1.0" {
		t.Fatalf("GET /api/v1/openapi.json without a token: %d", rec.Code)
	}
}
