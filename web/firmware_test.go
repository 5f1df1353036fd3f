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
	"strconv"
	"strings"
	"testing"
	"time"

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

// TestDeltaDownloadAcrossReplicas: a delta built by one replica is served
// by another from the database, with Range, to the URL signed for its job,
// target and base only; the bytes of each response (a download cut half
// way and resumed on the other replica included) are added to the job's
// count, and a pair with no built delta is 404.
func TestDeltaDownloadAcrossReplicas(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.New(t)
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	var arts []*firmware.Artifacts
	var urls []string
	for range 2 {
		a, err := firmware.NewArtifacts(pool, t.TempDir(), firmware.Keys{Signing: key}, []byte("url-key"))
		if err != nil {
			t.Fatal(err)
		}
		s := New(Options{AdminToken: token})
		s.MountFirmware(a, nil, FirmwareOptions{})
		hs := httptest.NewServer(s)
		t.Cleanup(hs.Close)
		arts, urls = append(arts, a), append(urls, hs.URL)
	}
	base := make([]byte, 1<<20)
	rand.Read(base)
	image := append(append([]byte(nil), base...), "one more table"...)
	baseArt, err := arts[0].Create(ctx, firmware.NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, bytes.NewReader(base))
	if err != nil {
		t.Fatal(err)
	}
	target, err := arts[0].Create(ctx, firmware.NewArtifact{Version: "1.1.0", Models: []string{"gw-100"}}, bytes.NewReader(image))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`INSERT INTO campaigns (id, name, firmware_id, version, spec, state) VALUES ('camp_1', 'c', '` + target.ID + `', '1.1.0', '{}', 'running')`,
		`INSERT INTO campaign_devices (campaign_id, device_id, position) VALUES ('camp_1', 'dev-1', 0)`,
		`INSERT INTO ota_jobs (id, campaign_id, device_id, kind, state, delta_base) VALUES ('job_1', 'camp_1', 'dev-1', 'forward', 'dispatched', '` + baseArt.SHA256 + `')`,
		`INSERT INTO firmware_deltas (base_sha256, target_sha256) VALUES ('` + baseArt.SHA256 + `', '` + target.SHA256 + `')`,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	path := firmware.DeltaPath(target.ID, baseArt.SHA256)
	signed := "?" + arts[0].SignURL(firmware.DeltaKey(target.ID, baseArt.SHA256), "dev-1", "job_1", time.Now().Add(time.Hour))
	get := func(url, rangeHeader string) (*http.Response, []byte) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		if rangeHeader != "" {
			req.Header.Set("Range", rangeHeader)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	if resp, b := get(urls[1]+path+signed, ""); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("delta not built yet: status %d %s, want 404", resp.StatusCode, b)
	}
	if built, err := arts[0].BuildDelta(ctx, firmware.DeltaOptions{}); err != nil || !built {
		t.Fatalf("BuildDelta = %v, %v", built, err)
	}
	var size int64
	var sum string
	if err := pool.QueryRow(ctx, `SELECT size, sha256 FROM firmware_deltas`).Scan(&size, &sum); err != nil {
		t.Fatal(err)
	}
	// Half from replica two, the rest from replica one.
	half := size / 2
	resp, first := get(urls[1]+path+signed, "bytes=0-"+strconv.FormatInt(half-1, 10))
	if resp.StatusCode != http.StatusPartialContent || int64(len(first)) != half || resp.Header.Get("ETag") != `"`+sum+`"` {
		t.Fatalf("first half: status %d, %d bytes, ETag %s", resp.StatusCode, len(first), resp.Header.Get("ETag"))
	}
	resp, rest := get(urls[0]+path+signed, "bytes="+strconv.FormatInt(half, 10)+"-")
	if resp.StatusCode != http.StatusPartialContent {
		t.Fatalf("resume: status %d", resp.StatusCode)
	}
	got := sha256.Sum256(append(first, rest...))
	if hex.EncodeToString(got[:]) != sum {
		t.Fatalf("the delta served in two halves is not the delta")
	}
	var sent, full int64
	if err := pool.QueryRow(ctx, `SELECT bytes_sent, full_bytes_sent FROM ota_jobs WHERE id = 'job_1'`).Scan(&sent, &full); err != nil {
		t.Fatal(err)
	}
	if sent != size || full != 0 {
		t.Errorf("job counts %d bytes sent (%d of the image), want %d (0)", sent, full, size)
	}
	// A URL signed for the image, for another base, or for another job does not open the delta.
	imageSigned := "?" + arts[0].SignURL(target.ID, "dev-1", "job_1", time.Now().Add(time.Hour))
	otherBase := firmware.DeltaPath(target.ID, target.SHA256) + "?" + arts[0].SignURL(firmware.DeltaKey(target.ID, baseArt.SHA256), "dev-1", "job_1", time.Now().Add(time.Hour))
	for name, url := range map[string]string{"image URL": urls[0] + path + imageSigned, "other base": urls[0] + otherBase,
		"other job": urls[0] + path + strings.Replace(signed, "job=job_1", "job=job_2", 1)} {
		if resp, b := get(url, ""); resp.StatusCode != http.StatusForbidden || !strings.Contains(string(b), `"field":"sig"`) {
			t.Errorf("%s: status %d %s, want 403 naming sig", name, resp.StatusCode, b)
		}
	}
}
