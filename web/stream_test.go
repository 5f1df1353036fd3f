package web

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

func TestStream(t *testing.T) {
	hub := NewHub()
	s := New(Options{AdminToken: token})
	s.MountStream(hub)
	srv := httptest.NewServer(s)
	defer srv.Close()

	if resp, _ := http.Get(srv.URL + "/api/v1/stream"); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("stream without a token: %d", resp.StatusCode)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/api/v1/stream", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("content type %q", resp.Header.Get("Content-Type"))
	}
	r := bufio.NewReader(resp.Body)
	r.ReadString('\n') // the opening comment
	for deadline := time.Now().Add(5 * time.Second); hub.subscribers() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the stream did not subscribe to the hub within 5s")
		}
	}
	hub.Observe(fleet.Event{DeviceID: "gw-1", Kind: fleet.KindBirth}) // not a presence change
	hub.Observe(fleet.Event{DeviceID: "gw-1", Kind: fleet.KindDisconnect, Reason: fleet.ReasonKeepaliveTimeout, Firmware: "1.0.3", ProtocolVersion: 4})
	var lines []string
	for len(lines) < 3 {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read: %v (so far %q)", err, lines)
		}
		if line = strings.TrimSpace(line); line != "" {
			lines = append(lines, line)
		} else if len(lines) > 0 {
			break
		}
	}
	if lines[0] != "event: presence" || !strings.Contains(lines[1], `"device_id":"gw-1"`) || !strings.Contains(lines[1], `"online":false`) ||
		!strings.Contains(lines[1], `"reason":"keepalive_timeout"`) || !strings.Contains(lines[1], `"protocol_version":"3.1.1"`) {
		t.Fatalf("event: %q", lines)
	}
	hub.Observe(fleet.Event{DeviceID: "gw-2", Kind: fleet.KindDisconnect, Reason: fleet.ReasonSessionTakeover})
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(line, "data:") {
			if !strings.Contains(line, `"device_id":"gw-2"`) || !strings.Contains(line, `"online":true`) {
				t.Fatalf("a takeover's disconnect must leave the device online: %s", line)
			}
			break
		}
	}
	hub.Close() // shutdown ends open streams
	if _, err := r.ReadString('\n'); err == nil {
		if _, err := r.ReadString('\n'); err == nil {
			t.Fatal("stream still open after the hub closed")
		}
	}
}
