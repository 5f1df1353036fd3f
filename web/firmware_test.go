package web

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/internal/pgtest"
)

// Two replicas on one database, each with its own data directory, behind
// no load balancer: the test picks the replica of each request.
func TestFirmwareAcrossReplicas(t *testing.T) {
	pool := pgtest.New(t)
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	replica := func() string {
		arts, err := firmware.NewArtifacts(pool, t.TempDir(), firmware.Keys{Signing: key}, []byte("url-key"))
		if err != nil {
			t.Fatal(err)
		}
		s := New(Options{AdminToken: token})
		s.MountFirmware(arts, nil, FirmwareOptions{})
		hs := httptest.NewServer(s)
		t.Cleanup(hs.Close)
		return hs.URL
	}
	one, two := replica(), replica()
	request := func(t *testing.T, method, url, rangeHeader string, body io.Reader) (*http.Response, []byte) {
		t.Helper()
		req, _ := http.NewRequest(method, url, body)
		req.Header.Set("Authorization", "Bearer "+token)
		if rangeHeader != "" {
			req.Header.Set("Range", rangeHeader)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp, b
	}
	upload := func(t *testing.T, version string, image []byte) firmware.Artifact {
		t.Helper()
		resp, b := request(t, http.MethodPost, one+"/api/v1/firmware?models=gw-100&version="+version, "", bytes.NewReader(image))
		var art firmware.Artifact
		if resp.StatusCode != http.StatusCreated || json.Unmarshal(b, &art) != nil {
			t.Fatalf("upload: status %d %s", resp.StatusCode, b)
		}
		return art
	}
	wantError := func(t *testing.T, resp *http.Response, b []byte, status int, code, naming string) {
		t.Helper()
		var e errorBody
		if resp.StatusCode != status || json.Unmarshal(b, &e) != nil || e.Error.Code != code || !strings.Contains(e.Error.Message, naming) {
			t.Fatalf("status %d %q, want %d with code %s naming %s", resp.StatusCode, b[:min(len(b), 300)], status, code, naming)
		}
	}
	newImage := func() []byte {
		b := make([]byte, 3<<20+123)
		rand.Read(b)
		return b
	}

	image := newImage()
	art := upload(t, "1.0.0", image)
	dl := "/api/v1/firmware/" + art.ID + "/download"
	resp, b := request(t, http.MethodGet, two+dl, "", nil)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(b, image) || resp.Header.Get("ETag") != `"`+art.SHA256+`"` {
		t.Fatalf("download from the other replica: status %d, %d bytes, ETag %s", resp.StatusCode, len(b), resp.Header.Get("ETag"))
	}
	resp, b = request(t, http.MethodGet, two+dl, "bytes=1048000-2100000", nil)
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(b, image[1048000:2100001]) {
		t.Fatalf("ranged download from the other replica: status %d, %d bytes", resp.StatusCode, len(b))
	}
	resp, _ = request(t, http.MethodHead, two+dl, "", nil)
	if resp.StatusCode != http.StatusOK || resp.ContentLength != int64(len(image)) {
		t.Fatalf("HEAD: status %d, length %d", resp.StatusCode, resp.ContentLength)
	}

	if resp, b := request(t, http.MethodDelete, one+"/api/v1/firmware/"+art.ID, "", nil); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("delete: status %d %s", resp.StatusCode, b)
	}
	resp, b = request(t, http.MethodGet, two+dl, "", nil)
	wantError(t, resp, b, http.StatusNotFound, "not_found", art.ID)

	t.Run("corrupt image", func(t *testing.T) {
		art := upload(t, "1.0.1", newImage()) // bytes replica two has not cached
		if _, err := pool.Exec(context.Background(), `UPDATE firmware_chunks SET data = overlay(data PLACING '\x00'::bytea FROM 7) WHERE sha256 = $1 AND seq = 2`, art.SHA256); err != nil {
			t.Fatal(err)
		}
		resp, b := request(t, http.MethodGet, two+"/api/v1/firmware/"+art.ID+"/download", "", nil)
		wantError(t, resp, b, http.StatusInternalServerError, "image_corrupt", art.ID)
	})
	t.Run("image nowhere", func(t *testing.T) {
		sum := sha256.Sum256([]byte("lost"))
		if _, err := pool.Exec(context.Background(), `INSERT INTO firmware (id, version, models, sha256, size, signature, signed_by)
			VALUES ('fw_lost', '0.9.0', '{gw-100}', $1, 4, 'sig', 'server')`, hex.EncodeToString(sum[:])); err != nil {
			t.Fatal(err)
		}
		resp, b := request(t, http.MethodGet, two+"/api/v1/firmware/fw_lost/download", "", nil)
		wantError(t, resp, b, http.StatusServiceUnavailable, "image_unavailable", "fw_lost")
	})
}
