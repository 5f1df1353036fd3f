package web

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const token = "test-admin-token-0123456789"

func do(t *testing.T, h http.Handler, method, path string, hdr map[string]string) (*httptest.ResponseRecorder, map[string]any) {
	t.Helper()
	req := httptest.NewRequest(method, path, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	var body map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		t.Fatalf("%s %s: body is not JSON: %q", method, path, rec.Body.String())
	}
	return rec, body
}

func TestBearerAuth(t *testing.T) {
	s := New(Options{AdminToken: token})
	tests := []struct {
		name   string
		header string
		status int
		code   string
	}{
		{"no header", "", http.StatusUnauthorized, "unauthorized"},
		{"wrong token", "Bearer wrong-token-0123456789", http.StatusUnauthorized, "unauthorized"},
		{"token prefix only", "Bearer " + token[:10], http.StatusUnauthorized, "unauthorized"},
		{"basic scheme", "Basic " + token, http.StatusUnauthorized, "unauthorized"},
		{"right token", "Bearer " + token, http.StatusOK, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hdr := map[string]string{}
			if tt.header != "" {
				hdr["Authorization"] = tt.header
			}
			rec, body := do(t, s, http.MethodGet, "/api/v1/server", hdr)
			if rec.Code != tt.status {
				t.Fatalf("status %d, want %d (body %v)", rec.Code, tt.status, body)
			}
			if tt.code != "" {
				if got := body["error"].(map[string]any)["code"]; got != tt.code {
					t.Fatalf("error code %v, want %s", got, tt.code)
				}
				if rec.Header().Get("WWW-Authenticate") == "" {
					t.Fatal("401 without WWW-Authenticate")
				}
			}
		})
	}
	t.Run("unknown api path is authenticated first", func(t *testing.T) {
		rec, _ := do(t, s, http.MethodGet, "/api/v1/nothing-here", nil)
		if rec.Code != http.StatusUnauthorized {
			t.Fatalf("status %d, want 401", rec.Code)
		}
		rec, body := do(t, s, http.MethodGet, "/api/v1/nothing-here", map[string]string{"Authorization": "Bearer " + token})
		if rec.Code != http.StatusNotFound || body["error"] == nil {
			t.Fatalf("status %d body %v, want a JSON 404", rec.Code, body)
		}
	})
}

func TestRequestID(t *testing.T) {
	s := New(Options{AdminToken: token})
	rec, _ := do(t, s, http.MethodGet, "/healthz", nil)
	generated := rec.Header().Get(RequestIDHeader)
	if len(generated) != 16 {
		t.Fatalf("generated request id %q, want 16 hex characters", generated)
	}
	rec, _ = do(t, s, http.MethodGet, "/healthz", map[string]string{RequestIDHeader: "lb-abc.123"})
	if got := rec.Header().Get(RequestIDHeader); got != "lb-abc.123" {
		t.Fatalf("caller's request id not echoed: got %q", got)
	}
	rec, _ = do(t, s, http.MethodGet, "/healthz", map[string]string{RequestIDHeader: "bad id\twith spaces"})
	if got := rec.Header().Get(RequestIDHeader); got == "bad id\twith spaces" || got == "" {
		t.Fatalf("unsafe request id echoed or none set: %q", got)
	}
}

func TestHealthAndReadiness(t *testing.T) {
	s := New(Options{AdminToken: token})
	if rec, _ := do(t, s, http.MethodGet, "/healthz", nil); rec.Code != http.StatusOK {
		t.Fatalf("/healthz: %d", rec.Code)
	}
	rec, _ := do(t, s, http.MethodGet, "/readyz", nil)
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz with no checks registered: %d, want 503", rec.Code)
	}

	dbErr := errors.New("connection refused")
	var dbDown bool
	s.AddCheck(Check{Name: "database", Check: func(context.Context) error {
		if dbDown {
			return dbErr
		}
		return nil
	}})
	s.AddCheck(Check{Name: "mqtt", Check: func(context.Context) error { return nil }})
	rec, body := do(t, s, http.MethodGet, "/readyz", nil)
	want := map[string]any{"status": "ready", "checks": map[string]any{"database": "ok", "mqtt": "ok"}}
	if rec.Code != http.StatusOK || !cmp.Equal(want, body) {
		t.Fatalf("/readyz: %d, mismatch (-want +got):\n%s", rec.Code, cmp.Diff(want, body))
	}
	dbDown = true
	rec, body = do(t, s, http.MethodGet, "/readyz", nil)
	want = map[string]any{"status": "not ready", "checks": map[string]any{"database": "connection refused", "mqtt": "ok"}}
	if rec.Code != http.StatusServiceUnavailable || !cmp.Equal(want, body) {
		t.Fatalf("/readyz: %d, mismatch (-want +got):\n%s", rec.Code, cmp.Diff(want, body))
	}
}

func TestMetricsExposed(t *testing.T) {
	s := New(Options{AdminToken: token})
	do(t, s, http.MethodGet, "/healthz", nil)
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), `fleetd_http_requests_total{code="200",method="GET",route="/healthz"} 1`) {
		t.Fatalf("/metrics: %d\n%s", rec.Code, rec.Body.String())
	}
}
