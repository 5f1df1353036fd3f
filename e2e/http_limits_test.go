package e2e

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/fleetdtest"
)

// TestHTTPLimits checks that the HTTP limits set through the environment
// reach the server: idle keep-alive connections are closed, wrong tokens
// past the limit get 429 while the right one still works, and live streams
// are capped per token.
func TestHTTPLimits(t *testing.T) {
	p, _ := fastFleetd(t, fleetdtest.DataDir(t), "FLEETD_HTTP_IDLE_TIMEOUT=500ms",
		"FLEETD_HTTP_AUTH_FAILURE_RATE=0.01", "FLEETD_HTTP_AUTH_FAILURE_BURST=2", "FLEETD_HTTP_MAX_STREAMS_PER_TOKEN=1")
	addr := strings.TrimPrefix(p.HTTPURL, "http://")

	t.Run("idle connection closed", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: fleetd\r\n\r\n")
		r := bufio.NewReader(c)
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		start := time.Now()
		c.SetReadDeadline(start.Add(5 * time.Second))
		_, err = r.ReadByte()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("idle keep-alive connection still open after 5s (FLEETD_HTTP_IDLE_TIMEOUT=500ms)")
		}
		if took := time.Since(start); took > 3*time.Second {
			t.Fatalf("idle connection closed after %s", took)
		}
	})

	get := func(path, auth string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, p.HTTPURL+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", "Bearer "+auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	want429 := func(t *testing.T, resp *http.Response) {
		t.Helper()
		resp.Body.Close()
		if resp.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("status %d, want 429", resp.StatusCode)
		}
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || s < 1 {
			t.Fatalf("Retry-After %q", resp.Header.Get("Retry-After"))
		}
	}

	t.Run("failed authentications", func(t *testing.T) {
		for i := range 2 {
			resp := get("/api/v1/server", "wrong-token-0123456789")
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("wrong token %d: status %d, want 401", i, resp.StatusCode)
			}
		}
		want429(t, get("/api/v1/server", "wrong-token-0123456789"))
		resp := get("/api/v1/server", p.Token())
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("the right token after the limit: status %d, want 200", resp.StatusCode)
		}
	})

	t.Run("live streams per token", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.HTTPURL+"/api/v1/stream", nil)
		req.Header.Set("Authorization", "Bearer "+p.Token())
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("first stream: status %d", resp.StatusCode)
		}
		want429(t, get("/api/v1/stream", p.Token()))
	})
}
