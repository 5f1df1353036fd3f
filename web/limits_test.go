package web

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/internal/pgtest"
)

// serveLimited serves s with the http.Server fleetd uses (s.HTTPServer) on
// 127.0.0.1:0 and returns its address. With sndbuf above 0 every accepted
// connection gets that socket send buffer, so that a client that stops
// reading blocks the server's writes after a few kilobytes.
func serveLimited(t *testing.T, s *Server, sndbuf int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if sndbuf > 0 {
		ln = smallSendBuffers{ln, sndbuf}
	}
	hs := s.HTTPServer()
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { hs.Close() })
	return ln.Addr().String()
}

type smallSendBuffers struct {
	net.Listener
	size int
}

func (l smallSendBuffers) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetWriteBuffer(l.size)
	}
	return c, err
}

// rawConn is an HTTP/1.1 client connection whose reading the test controls.
type rawConn struct {
	net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, addr string, rcvbuf int) *rawConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if rcvbuf > 0 {
		_ = c.(*net.TCPConn).SetReadBuffer(rcvbuf)
	}
	return &rawConn{Conn: c, r: bufio.NewReaderSize(c, 4096)}
}

// send writes a request head; the body, if any, is the caller's to write.
func (c *rawConn) send(t *testing.T, method, path string, hdr ...string) {
	t.Helper()
	head := method + " " + path + " HTTP/1.1\r\nHost: fleetd\r\n"
	for _, h := range hdr {
		head += h + "\r\n"
	}
	if _, err := io.WriteString(c, head+"\r\n"); err != nil {
		t.Fatal(err)
	}
}

func (c *rawConn) response(t *testing.T, method string) *http.Response {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(c.r, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	return resp
}

func errorCode(t *testing.T, body io.Reader) string {
	t.Helper()
	var e errorBody
	if err := json.NewDecoder(body).Decode(&e); err != nil {
		t.Fatalf("error body is not the API's JSON error: %v", err)
	}
	return e.Error.Code
}

func wantTooMany(t *testing.T, resp *http.Response) {
	t.Helper()
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("status %d, want 429", resp.StatusCode)
	}
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || s < 1 {
		t.Fatalf("Retry-After %q, want whole seconds", resp.Header.Get("Retry-After"))
	}
	if code := errorCode(t, resp.Body); code != "rate_limited" {
		t.Fatalf("error code %q, want rate_limited", code)
	}
}

func TestIdleConnectionClosed(t *testing.T) {
	const idle = 300 * time.Millisecond
	addr := serveLimited(t, New(Options{AdminToken: token, Limits: Limits{IdleTimeout: idle}}), 0)
	c := dialRaw(t, addr, 0)
	for i := range 2 { // the connection is kept alive between requests
		c.send(t, http.MethodGet, "/healthz")
		resp := c.response(t, http.MethodGet)
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK || resp.Close {
			t.Fatalf("request %d: status %d, close %v", i, resp.StatusCode, resp.Close)
		}
	}
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(5 * time.Second))
	_, err := c.r.ReadByte()
	took := time.Since(start)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("an idle keep-alive connection still open after %s (idle timeout %s)", took, idle)
	}
	if err == nil {
		t.Fatal("the server sent something on an idle connection")
	}
	if took < idle/2 || took > idle+2*time.Second {
		t.Fatalf("idle connection closed after %s, want about %s", took, idle)
	}
}

func TestRequestBodyReadTimeout(t *testing.T) {
	const readTimeout = 300 * time.Millisecond
	s := New(Options{AdminToken: token, Limits: Limits{ReadTimeout: readTimeout}})
	s.MountFirmware(nil, nil, FirmwareOptions{})
	addr := serveLimited(t, s, 0)
	c := dialRaw(t, addr, 0)
	start := time.Now()
	c.send(t, http.MethodPost, "/api/v1/campaigns", "Authorization: Bearer "+token, "Content-Type: application/json", "Content-Length: 100")
	io.WriteString(c, `{"name":`) // and nothing more
	resp := c.response(t, http.MethodPost)
	if resp.StatusCode != http.StatusRequestTimeout || errorCode(t, resp.Body) != "timeout" {
		t.Fatalf("a body that stops arriving: status %d, want 408", resp.StatusCode)
	}
	if took := time.Since(start); took > readTimeout+2*time.Second {
		t.Fatalf("answered after %s, read timeout %s", took, readTimeout)
	}
}

// firmwareServer serves the firmware API over a real database, with two
// images: big (8 MiB) and small (4 MiB).
func firmwareServer(t *testing.T, l Limits, o FirmwareOptions) (addr string, big, small firmware.Artifact, arts *firmware.Artifacts) {
	t.Helper()
	ctx := context.Background()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	arts, err := firmware.NewArtifacts(pgtest.New(t), t.TempDir(), firmware.Keys{Signing: key}, []byte("url-key"))
	if err != nil {
		t.Fatal(err)
	}
	image := func(size int) []byte { b := make([]byte, size); rand.Read(b); return b }
	if big, err = arts.Create(ctx, firmware.NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, bytes.NewReader(image(8<<20))); err != nil {
		t.Fatal(err)
	}
	if small, err = arts.Create(ctx, firmware.NewArtifact{Version: "1.0.1", Models: []string{"gw-100"}}, bytes.NewReader(image(4<<20))); err != nil {
		t.Fatal(err)
	}
	s := New(Options{AdminToken: token, Limits: l})
	s.MountFirmware(arts, nil, o)
	return serveLimited(t, s, 16<<10), big, small, arts
}

func TestDownloadStallLosesItsSlot(t *testing.T) {
	const stall = 300 * time.Millisecond
	addr, big, small, _ := firmwareServer(t, Limits{StallTimeout: stall}, FirmwareOptions{MaxDownloads: 2, MaxDownloadsPerSource: 1})
	auth := "Authorization: Bearer " + token
	request := func(method string) *http.Response {
		c := dialRaw(t, addr, 0)
		c.send(t, method, "/api/v1/firmware/"+small.ID+"/download", auth)
		return c.response(t, method)
	}

	// A client that reads nothing after the headers, with a small socket
	// buffer: the server's writes block at once.
	stalled := dialRaw(t, addr, 4096)
	stalled.send(t, http.MethodGet, "/api/v1/firmware/"+big.ID+"/download", auth)
	if resp := stalled.response(t, http.MethodGet); resp.StatusCode != http.StatusOK {
		t.Fatalf("download: status %d", resp.StatusCode)
	}
	start := time.Now()
	// It holds its address's only slot...
	wantTooMany(t, request(http.MethodGet))
	// ...until its stall deadline takes it back.
	for {
		resp := request(http.MethodHead)
		if resp.StatusCode == http.StatusOK {
			break
		}
		if resp.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("download: status %d", resp.StatusCode)
		}
		if time.Since(start) > stall+3*time.Second {
			t.Fatalf("the stalled download still holds its slot after %s (stall timeout %s)", time.Since(start), stall)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Its connection is closed: what was in flight, then the end.
	_ = stalled.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := io.Copy(io.Discard, stalled.r)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the stalled download's connection is still open")
	}
	if n >= big.Size {
		t.Fatalf("the stalled client got the whole image (%d bytes)", n)
	}

	t.Run("slow but moving download completes", func(t *testing.T) {
		// A receive buffer of a sixteenth of the image, so the server's
		// writes wait for the reader all along. (A much smaller one on
		// loopback, whose segments are 64 KiB, slows TCP to a crawl.)
		c := dialRaw(t, addr, 256<<10)
		c.send(t, http.MethodGet, "/api/v1/firmware/"+small.ID+"/download", auth)
		resp := c.response(t, http.MethodGet)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("download: status %d", resp.StatusCode)
		}
		start := time.Now()
		var got int64
		for {
			// A little every 100 ms: well under the image's size per
			// stall timeout, yet the download outlives that timeout.
			n, err := io.CopyN(io.Discard, resp.Body, 256<<10)
			got += n
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("after %d bytes in %s: %v", got, time.Since(start), err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if got != small.Size {
			t.Fatalf("got %d bytes, want %d", got, small.Size)
		}
		if took := time.Since(start); took < 3*stall {
			t.Fatalf("took %s: too fast to show that a moving download outlives the stall timeout %s", took, stall)
		}
	})
}

func TestSlowUploadIsNotCutByReadTimeout(t *testing.T) {
	const readTimeout = 300 * time.Millisecond
	addr, _, _, arts := firmwareServer(t, Limits{ReadTimeout: readTimeout}, FirmwareOptions{})
	image := make([]byte, 1<<20)
	rand.Read(image)
	c := dialRaw(t, addr, 0)
	c.send(t, http.MethodPost, "/api/v1/firmware?version=2.0.0&models=gw-100", "Authorization: Bearer "+token,
		"Content-Type: application/octet-stream", "Content-Length: "+strconv.Itoa(len(image)))
	start := time.Now()
	for b := image; len(b) > 0; b = b[min(len(b), 64<<10):] {
		if _, err := c.Write(b[:min(len(b), 64<<10)]); err != nil {
			t.Fatalf("after %s: %v", time.Since(start), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	resp := c.response(t, http.MethodPost)
	if resp.StatusCode != http.StatusCreated {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("a slow upload: status %d %s", resp.StatusCode, b)
	}
	if took := time.Since(start); took < 3*readTimeout {
		t.Fatalf("took %s: too fast to show that an upload outlives the read timeout %s", took, readTimeout)
	}
	list, err := arts.List(context.Background())
	if err != nil || len(list) != 3 {
		t.Fatalf("after the upload: %d images, %v", len(list), err)
	}

	t.Run("a stalled upload is cut", func(t *testing.T) {
		c := dialRaw(t, addr, 0)
		c.send(t, http.MethodPost, "/api/v1/firmware?version=2.0.1&models=gw-100", "Authorization: Bearer "+token,
			"Content-Type: application/octet-stream", "Content-Length: 1000000")
		c.Write(image[:1000])
		start := time.Now()
		resp := c.response(t, http.MethodPost)
		if resp.StatusCode != http.StatusRequestTimeout {
			t.Fatalf("a stalled upload: status %d, want 408", resp.StatusCode)
		}
		if took := time.Since(start); took > readTimeout+2*time.Second {
			t.Fatalf("answered after %s, read timeout %s", took, readTimeout)
		}
	})
}

func TestStreamCap(t *testing.T) {
	hub := NewHub()
	s := New(Options{AdminToken: token, Limits: Limits{MaxStreamsPerToken: 2, MaxStreams: 10}})
	s.MountStream(hub)
	url := "http://" + serveLimited(t, s, 0) + "/api/v1/stream"
	open := func(ctx context.Context) *http.Response {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	var cancels []context.CancelFunc
	for i := range 2 {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		cancels = append(cancels, cancel)
		if resp := open(ctx); resp.StatusCode != http.StatusOK {
			t.Fatalf("stream %d: status %d", i, resp.StatusCode)
		}
	}
	wantTooMany(t, open(context.Background()))
	// Closing a stream makes room.
	cancels[0]()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		resp := open(ctx)
		if resp.StatusCode == http.StatusOK {
			break
		}
		resp.Body.Close()
		if time.Now().After(deadline) {
			t.Fatal("a closed stream still counts against the cap after 5s")
		}
	}
}

func TestHubSubscribeCaps(t *testing.T) {
	type sub struct {
		token string
		ok    bool
	}
	tests := []struct {
		name             string
		perToken, total  int
		subs             []sub
		closeFirst       bool
		afterClose       sub
		wantOpen, wantBy int // open in all, and for token "a", at the end
	}{
		{name: "per token", perToken: 2, total: 10,
			subs: []sub{{"a", true}, {"a", true}, {"a", false}, {"b", true}}, wantOpen: 2, wantBy: 1},
		{name: "in all", perToken: 0, total: 3,
			subs: []sub{{"a", true}, {"b", true}, {"c", true}, {"d", false}, {"a", false}}, wantOpen: 2, wantBy: 0},
		{name: "no caps", subs: []sub{{"a", true}, {"a", true}, {"a", true}}, wantOpen: 2, wantBy: 2},
		{name: "closing makes room", perToken: 1, total: 1,
			subs: []sub{{"a", true}, {"b", false}}, afterClose: sub{"b", true}, wantOpen: 1, wantBy: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := NewHub()
			var dones []func()
			for i, s := range tt.subs {
				_, done, ok := h.subscribe(s.token, tt.perToken, tt.total)
				if ok != s.ok {
					t.Fatalf("subscription %d (%s): ok %v, want %v", i, s.token, ok, s.ok)
				}
				if ok {
					dones = append(dones, done)
				}
			}
			dones[0]()
			dones[0]() // twice is once
			if tt.afterClose.token != "" {
				if _, _, ok := h.subscribe(tt.afterClose.token, tt.perToken, tt.total); ok != tt.afterClose.ok {
					t.Fatalf("after a close: ok %v, want %v", ok, tt.afterClose.ok)
				}
			}
			h.Close() // streams count until their handler is done with them
			if h.open != tt.wantOpen || h.openByToken["a"] != tt.wantBy {
				t.Fatalf("open %d (a: %d), want %d (a: %d)", h.open, h.openByToken["a"], tt.wantOpen, tt.wantBy)
			}
		})
	}
}

// syncBuffer is a log destination that tests read while the server writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestAuthFailureLimit(t *testing.T) {
	var logs syncBuffer
	s := New(Options{AdminToken: token, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		Limits: Limits{AuthFailureRate: 0.01, AuthFailureBurst: 3}})
	addr := serveLimited(t, s, 0)
	get := func(from, auth string) *http.Response {
		t.Helper()
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
		c := &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}
		req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/api/v1/server", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.CloseIdleConnections)
		return resp
	}
	status := func(from, auth string) int {
		t.Helper()
		resp := get(from, auth)
		resp.Body.Close()
		return resp.StatusCode
	}
	wrong := "Bearer wrong-token-0123456789"
	for i := range 3 {
		if st := status("127.0.0.1", wrong); st != http.StatusUnauthorized {
			t.Fatalf("wrong token %d: status %d, want 401", i, st)
		}
	}
	for range 10 {
		wantTooMany(t, get("127.0.0.1", wrong))
	}
	if st := status("127.0.0.1", "Bearer "+token); st != http.StatusOK {
		t.Fatalf("the right token from a throttled address: status %d, want 200", st)
	}
	if st := status("127.0.0.1", ""); st != http.StatusUnauthorized {
		t.Fatalf("no token from a throttled address: status %d, want 401", st)
	}
	if st := status("127.0.0.2", wrong); st != http.StatusUnauthorized {
		t.Fatalf("a wrong token from another address: status %d, want 401", st)
	}
	if n := strings.Count(logs.String(), "too many failed API authentications"); n != 1 {
		t.Fatalf("%d log lines for ten refusals, want 1:\n%s", n, logs.String())
	}
}

func TestAuthFailuresBounded(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	a := newAuthFailures(Limits{AuthFailureRate: 1, AuthFailureBurst: 2}, slog.New(slog.DiscardHandler))
	a.now = func() time.Time { return now }
	a.max = 2
	src := func(i int) netip.Prefix { return sourceOf(fmt.Sprintf("192.0.2.%d:1883", i)) }

	for i := range 2 {
		if ok, _ := a.fail(src(1)); !ok {
			t.Fatalf("failure %d within the burst refused", i)
		}
	}
	ok, retry := a.fail(src(1))
	if ok || retry <= 0 || retry > time.Second {
		t.Fatalf("third failure: within %v, retry after %s; want refused, retry within 1s", ok, retry)
	}
	a.fail(src(2))
	// The map is full: a third source shares the overflow bucket.
	a.fail(src(3))
	a.fail(src(4))
	if ok, _ := a.fail(src(5)); ok || a.tracked() != 2 {
		t.Fatalf("overflow: within %v, %d sources tracked; want refused, 2", ok, a.tracked())
	}
	// Refilled buckets whose source was not logged lately are forgotten.
	now = now.Add(2 * time.Minute)
	if ok, _ := a.fail(src(6)); !ok || a.tracked() != 1 {
		t.Fatalf("after two minutes: within %v, %d sources tracked; want admitted, 1 (the new one)", ok, a.tracked())
	}

	for _, tc := range []struct {
		addr string
		want string
	}{
		{"192.0.2.7:80", "192.0.2.7/32"},
		{"[::ffff:192.0.2.7]:80", "192.0.2.7/32"},
		{"[2001:db8:1:2:3:4:5:6]:80", "2001:db8:1:2::/64"},
		{"pipe", "invalid Prefix"},
	} {
		if got := sourceOf(tc.addr).String(); got != tc.want {
			t.Errorf("sourceOf(%s) = %s, want %s", tc.addr, got, tc.want)
		}
	}
}
