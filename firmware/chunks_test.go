package firmware

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/pgtest"
)

// replicas are artifact stores on one database, each with its own data
// directory, as fleetd replicas behind a load balancer are.
type replicas struct {
	pool *pgxpool.Pool
	key  ed25519.PrivateKey
}

func newReplicas(t *testing.T) replicas {
	t.Helper()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	return replicas{pool: pgtest.New(t), key: key}
}

// start starts a replica on dir (a restart when dir was used before), with
// its log in buf when buf is not nil.
func (rs replicas) start(t *testing.T, dir string, buf *bytes.Buffer) *Artifacts {
	t.Helper()
	var opts []ArtifactOption
	if buf != nil {
		opts = append(opts, WithLogger(slog.New(slog.NewTextHandler(buf, nil))))
	}
	a, err := NewArtifacts(rs.pool, dir, Keys{Signing: rs.key}, []byte("url-key"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func randomImage(size int) []byte {
	b := make([]byte, size)
	rand.Read(b)
	return b
}

// readAll opens an artifact on a replica and reads it whole.
func readAll(t *testing.T, a *Artifacts, id string) []byte {
	t.Helper()
	_, f, err := a.Open(context.Background(), id)
	if err != nil {
		t.Fatalf("open %s: %v", id, err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// serve answers a GET of an artifact as the download endpoint does
// (http.ServeContent over what Open gives).
func serve(t *testing.T, a *Artifacts, id, rangeHeader string) *httptest.ResponseRecorder {
	t.Helper()
	art, f, err := a.Open(context.Background(), id)
	if err != nil {
		t.Fatalf("open %s: %v", id, err)
	}
	defer f.Close()
	req := httptest.NewRequest(http.MethodGet, "/download", nil)
	if rangeHeader != "" {
		req.Header.Set("Range", rangeHeader)
	}
	rec := httptest.NewRecorder()
	http.ServeContent(rec, req, art.Version+".bin", art.CreatedAt, f)
	return rec
}

func chunkDigests(t *testing.T, pool *pgxpool.Pool) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT DISTINCT sha256 FROM firmware_chunks ORDER BY sha256`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := []string{}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	return out
}

// An image uploaded through one replica is served by another, whole and
// by range, from the other's cache once it has filled it; concurrent first
// downloads fill it once; a delete through the first makes it 404 on the
// other, whose cached file goes at its next start.
func TestReplicasShareImages(t *testing.T) {
	rs := newReplicas(t)
	ctx := context.Background()
	dir1, dir2, dir3 := t.TempDir(), t.TempDir(), t.TempDir()
	r1, r2, r3 := rs.start(t, dir1, nil), rs.start(t, dir2, nil), rs.start(t, dir3, nil)
	image := randomImage(2*chunkSize + chunkSize/2 + 17) // three chunks, the last one short
	art, err := r1.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, bytes.NewReader(image))
	if err != nil {
		t.Fatal(err)
	}
	var chunks int
	if err := rs.pool.QueryRow(ctx, `SELECT count(*) FROM firmware_chunks WHERE sha256 = $1`, art.SHA256).Scan(&chunks); err != nil || chunks != 3 {
		t.Fatalf("%d chunks in the database (%v), want 3", chunks, err)
	}
	wantFiles(t, r1, dir1) // the uploading replica caches what it received
	if diff := cmp.Diff([]string{}, storedFiles(t, dir2)); diff != "" {
		t.Fatalf("replica 2 has files before any download (-want +got):\n%s", diff)
	}

	if got := readAll(t, r2, art.ID); !bytes.Equal(got, image) {
		t.Fatalf("replica 2 served %d bytes that are not the image", len(got))
	}
	if n := r2.fills.Load(); n != 1 {
		t.Fatalf("replica 2 filled its cache %d times, want 1", n)
	}
	wantFiles(t, r2, dir2)
	// Across the first chunk boundary, and the end of the image.
	for _, rg := range []struct {
		header   string
		from, to int
	}{
		{"bytes=1048000-1049999", 1048000, 1050000},
		{"bytes=-100", len(image) - 100, len(image)},
	} {
		rec := serve(t, r2, art.ID, rg.header)
		if rec.Code != http.StatusPartialContent || !bytes.Equal(rec.Body.Bytes(), image[rg.from:rg.to]) {
			t.Fatalf("range %s: status %d, %d bytes, want 206 with bytes %d-%d", rg.header, rec.Code, rec.Body.Len(), rg.from, rg.to)
		}
	}
	if rec := serve(t, r2, art.ID, ""); rec.Code != http.StatusOK || !bytes.Equal(rec.Body.Bytes(), image) {
		t.Fatalf("full download: status %d, %d bytes", rec.Code, rec.Body.Len())
	}
	if n := r2.fills.Load(); n != 1 {
		t.Fatalf("replica 2 went to the database %d times for one image, want once: later downloads come from its cache", n)
	}
	if n := r1.fills.Load(); n != 0 {
		t.Fatalf("the uploading replica went to the database %d times", n)
	}

	t.Run("concurrent first downloads fill once", func(t *testing.T) {
		var wg sync.WaitGroup
		got := make([][]byte, 8)
		for i := range got {
			wg.Go(func() {
				_, f, err := r3.Open(ctx, art.ID)
				if err != nil {
					t.Error(err)
					return
				}
				defer f.Close()
				got[i], _ = io.ReadAll(f)
			})
		}
		wg.Wait()
		for i, b := range got {
			if !bytes.Equal(b, image) {
				t.Fatalf("download %d: %d bytes that are not the image", i, len(b))
			}
		}
		if n := r3.fills.Load(); n != 1 {
			t.Fatalf("8 concurrent first downloads filled the cache %d times, want 1", n)
		}
	})

	if err := r1.Delete(ctx, art.ID); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r2.Open(ctx, art.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("download on replica 2 after a delete on replica 1: %v, want ErrNotFound", err)
	}
	if diff := cmp.Diff([]string{}, chunkDigests(t, rs.pool)); diff != "" {
		t.Fatalf("chunks left after the delete (-want +got):\n%s", diff)
	}
	wantFiles(t, r1, dir1)
	if len(storedFiles(t, dir2)) == 0 {
		t.Fatal("replica 2 dropped its cached file at once; the test expects it lazily, at its next start")
	}
	r2 = rs.start(t, dir2, nil)
	wantFiles(t, r2, dir2)
}

// A chunk changed in the database makes another replica's first download
// fail with a digest error, and caches nothing; a chunk missing too.
func TestCorruptChunkNotServed(t *testing.T) {
	rs := newReplicas(t)
	ctx := context.Background()
	r1 := rs.start(t, t.TempDir(), nil)
	image := randomImage(2*chunkSize + 5)
	art, err := r1.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, bytes.NewReader(image))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, sql string }{
		{"changed bytes", `UPDATE firmware_chunks SET data = overlay(data PLACING '\xdeadbeef'::bytea FROM 100) WHERE sha256 = $1 AND seq = 1`},
		{"missing chunk", `DELETE FROM firmware_chunks WHERE sha256 = $1 AND seq = 1`},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, err := rs.pool.Exec(ctx, c.sql, art.SHA256); err != nil {
				t.Fatal(err)
			}
			var log bytes.Buffer
			dir2 := t.TempDir()
			r2 := rs.start(t, dir2, &log)
			_, f, err := r2.Open(ctx, art.ID)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), art.ID) {
				t.Fatalf("open: %v (file %v), want ErrCorrupt naming %s", err, f, art.ID)
			}
			if diff := cmp.Diff([]string{}, storedFiles(t, dir2)); diff != "" {
				t.Fatalf("files left by a corrupt fill (-want +got):\n%s", diff)
			}
			if !strings.Contains(log.String(), "firmware="+art.ID) {
				t.Fatalf("the corruption is not logged with the artifact:\n%s", log.String())
			}
			// The replica that received the image still serves what it
			// verified then.
			if got := readAll(t, r1, art.ID); !bytes.Equal(got, image) {
				t.Fatal("replica 1 lost its verified copy")
			}
		})
	}
}

// An artifact recorded before images lived in the database (a file, no
// chunks) is imported by the replica that has its file when it starts; one
// whose file is nowhere is reported unavailable, and one whose file does
// not match its record is not imported.
func TestImportLocalImages(t *testing.T) {
	rs := newReplicas(t)
	ctx := context.Background()
	dir1 := t.TempDir()
	r1 := rs.start(t, dir1, nil)
	old := func(id, version string, image []byte, file []byte) {
		t.Helper()
		sum := digestOf(image)
		if _, err := rs.pool.Exec(ctx, `INSERT INTO firmware (id, version, models, sha256, size, signature, signed_by)
			VALUES ($1, $2, '{gw-100}', $3, $4, 'sig', 'server')`, id, version, sum, len(image)); err != nil {
			t.Fatal(err)
		}
		if file != nil {
			if err := os.MkdirAll(dir1+"/"+sum[:2], 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(r1.path(sum), file, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	good := randomImage(chunkSize + 1)
	bad := randomImage(1000)
	old("fw_good", "1.0.0", good, good)
	old("fw_nowhere", "1.0.1", []byte("nowhere"), nil)
	old("fw_bad", "1.0.2", bad, append([]byte("X"), bad[1:]...))

	var log bytes.Buffer
	r1 = rs.start(t, dir1, &log)
	lines := strings.Split(strings.TrimSpace(log.String()), "\n")
	want := map[string]string{
		"fw_good":    "imported firmware image into the database",
		"fw_nowhere": "firmware image unavailable",
		"fw_bad":     "firmware image not imported",
	}
	for id, msg := range want {
		found := 0
		for _, l := range lines {
			if strings.Contains(l, id) && strings.Contains(l, msg) {
				found++
			}
		}
		if found != 1 {
			t.Errorf("%d log lines with %q for %s, want 1:\n%s", found, msg, id, log.String())
		}
	}
	if diff := cmp.Diff([]string{digestOf(good)}, chunkDigests(t, rs.pool)); diff != "" {
		t.Fatalf("chunks after the import (-want +got):\n%s", diff)
	}

	r2 := rs.start(t, t.TempDir(), nil)
	if got := readAll(t, r2, "fw_good"); !bytes.Equal(got, good) {
		t.Fatal("the imported image is not served by another replica")
	}
	for _, id := range []string{"fw_nowhere", "fw_bad"} {
		if _, _, err := r2.Open(ctx, id); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), id) {
			t.Fatalf("open %s: %v, want ErrUnavailable naming it", id, err)
		}
	}

	// The next start has nothing to import.
	log.Reset()
	rs.start(t, dir1, &log)
	if strings.Contains(log.String(), "imported") {
		t.Fatalf("imported again:\n%s", log.String())
	}
}

// generated is a 64 MiB image that exists only as it is read, hashed as it
// goes.
type generated struct {
	left int64
	rng  *mrand.ChaCha8
	h    hash.Hash
}

func (g *generated) Read(p []byte) (int, error) {
	if g.left == 0 {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), g.left)]
	_, _ = g.rng.Read(p)
	g.h.Write(p)
	g.left -= int64(len(p))
	return len(p), nil
}

// A 64 MiB upload streams (the test never has the image in memory, and
// neither does the store: it allocates far less than the image), and
// another replica serves the same bytes. It reports the throughput of
// both directions through PostgreSQL.
func TestLargeImageStreams(t *testing.T) {
	if testing.Short() {
		t.Skip("64 MiB through PostgreSQL")
	}
	const size = 64 << 20
	rs := newReplicas(t)
	ctx := context.Background()
	r1, r2 := rs.start(t, t.TempDir(), nil), rs.start(t, t.TempDir(), nil)
	h := sha256.New()
	src := &generated{left: size, rng: mrand.NewChaCha8([32]byte{1}), h: h}

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	art, err := r1.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, src)
	up := time.Since(start)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if want := hex.EncodeToString(h.Sum(nil)); art.SHA256 != want || art.Size != size {
		t.Fatalf("stored %d bytes with %s, want %d with %s", art.Size, art.SHA256, size, want)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > size/2 {
		t.Fatalf("the upload allocated %d MiB for a %d MiB image: it is not streamed", alloc>>20, size>>20)
	} else {
		t.Logf("upload allocated %.1f MiB", float64(alloc)/(1<<20))
	}

	start = time.Now()
	_, f, err := r2.Open(ctx, art.ID)
	fill := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dh := sha256.New()
	if n, err := io.Copy(dh, f); err != nil || n != size || hex.EncodeToString(dh.Sum(nil)) != art.SHA256 {
		t.Fatalf("replica 2 served %d bytes (%v) that are not the image", n, err)
	}
	mib := float64(size) / (1 << 20)
	t.Logf("64 MiB: upload (to a temporary file, then into PostgreSQL) %s = %.0f MiB/s; first download on another replica (PostgreSQL to its cache, verified) %s = %.0f MiB/s",
		up.Round(time.Millisecond), mib/up.Seconds(), fill.Round(time.Millisecond), mib/fill.Seconds())
}
