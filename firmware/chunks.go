package firmware

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// Image bytes live in PostgreSQL, in firmware_chunks (migration 00010): one
// row per chunkSize bytes of a digest, however many artifacts have those
// bytes, so that every replica on the database serves every image. A
// digest's chunks are written in the transaction that inserts its first
// artifact row and deleted in the one that deletes its last, both under the
// digest's advisory lock (storage.go): they exist exactly while a row has
// the digest, and no reconciliation is needed for them.
//
// The content-addressed directory is this replica's cache of them: the
// replica that receives an upload keeps its file, and another fills its
// cache on the first download (fill), so a download is served from a local
// file with Range support. A cached file was hashed when it was written, so
// serving it checks only its size.

// chunkSize is the size of a firmware_chunks row: big enough that an image
// is a few rows, small enough that a row is cheap to hold in memory.
const chunkSize = 1 << 20

// fillTimeout bounds the filling of the cache from the database. A fill
// does not stop when the download that started it goes away: other
// downloads of the image may be waiting for it.
const fillTimeout = 5 * time.Minute

// hasChunks says whether a digest's image is in the database.
func hasChunks(ctx context.Context, tx pgx.Tx, sum string) (bool, error) {
	var ok bool
	err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM firmware_chunks WHERE sha256 = $1)`, sum).Scan(&ok)
	return ok, err
}

// storeChunks copies the file at path into firmware_chunks as the image of
// sum, unless the database has it already (another artifact with the same
// bytes). It streams, one chunk in memory at a time, and hashes what it
// sends: bytes that are not the image of sum (size bytes with that SHA-256)
// are ErrCorrupt, and the caller's transaction must not commit. The caller
// holds the digest's lock.
func storeChunks(ctx context.Context, tx pgx.Tx, sum string, size int64, path string) error {
	if have, err := hasChunks(ctx, tx, sum); err != nil || have {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	src := &chunkSource{sum: sum, r: f, buf: make([]byte, chunkSize), seq: -1, h: sha256.New()}
	if _, err := tx.CopyFrom(ctx, pgx.Identifier{"firmware_chunks"}, []string{"sha256", "seq", "data"}, src); err != nil {
		return fmt.Errorf("store image %s: %w", sum, err)
	}
	if got := hex.EncodeToString(src.h.Sum(nil)); got != sum || src.size != size {
		return fmt.Errorf("store image %s: %s holds %d bytes with SHA-256 %s, want %d: %w", sum, path, src.size, got, size, ErrCorrupt)
	}
	return nil
}

// chunkSource feeds a file to CopyFrom one chunk at a time, in one reused
// buffer (CopyFrom encodes a row before it asks for the next).
type chunkSource struct {
	sum  string
	r    io.Reader
	buf  []byte
	n    int
	seq  int32
	h    hash.Hash
	size int64
	err  error
}

func (s *chunkSource) Next() bool {
	n, err := io.ReadFull(s.r, s.buf)
	if n == 0 || err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		if !errors.Is(err, io.EOF) {
			s.err = err
		}
		return false
	}
	s.n, s.seq, s.size = n, s.seq+1, s.size+int64(n)
	s.h.Write(s.buf[:n])
	return true
}

func (s *chunkSource) Values() ([]any, error) { return []any{s.sum, s.seq, s.buf[:s.n]}, nil }
func (s *chunkSource) Err() error             { return s.err }

// readChunks writes the image of sum from the database to w, streaming (one
// row at a time, read in one snapshot) and returns how many bytes and chunks
// it wrote. A gap in the chunks is ErrCorrupt; no chunk at all is not an
// error (chunks is 0).
func (a *Artifacts) readChunks(ctx context.Context, sum string, w io.Writer) (n int64, chunks int32, err error) {
	rows, err := a.pool.Query(ctx, `SELECT seq, data FROM firmware_chunks WHERE sha256 = $1 ORDER BY seq`, sum)
	if err != nil {
		return 0, 0, err
	}
	defer rows.Close()
	var seq int32
	var data pgtype.DriverBytes // the driver's memory, valid until the next row
	for rows.Next() {
		if err := rows.Scan(&seq, &data); err != nil {
			return n, chunks, err
		}
		if seq != chunks {
			return n, chunks, fmt.Errorf("image %s: chunk %d missing: %w", sum, chunks, ErrCorrupt)
		}
		m, err := w.Write(data)
		n += int64(m)
		if err != nil {
			return n, chunks, err
		}
		chunks++
	}
	return n, chunks, rows.Err()
}

// blob is what the cache holds: an image or a delta, by digest and size,
// with a name for errors and logs, and how to tell that its row is gone
// (an error wrapping ErrNotFound) once its chunks are not found.
type blob struct {
	sum  string
	size int64
	name string
	// logKey and logID name it in logs: "firmware" and the artifact's id,
	// or "delta" and the target's id.
	logKey, logID string
	gone          func(ctx context.Context) error
}

func (a Artifact) blob(as *Artifacts) blob {
	return blob{sum: a.SHA256, size: a.Size, name: "firmware " + a.ID + " (" + a.Version + ")", logKey: "firmware", logID: a.ID,
		gone: func(ctx context.Context) error { _, err := as.Get(ctx, a.ID); return err }}
}

// cached opens the cached bytes of b, if this replica has them whole.
func (a *Artifacts) cached(b blob) (*os.File, bool) {
	f, err := os.Open(a.path(b.sum))
	if err != nil {
		return nil, false
	}
	if st, err := f.Stat(); err != nil || st.Size() != b.size {
		f.Close()
		return nil, false
	}
	return f, true
}

// openBlob opens b from the cache, filling it from the database first if
// need be, once however many downloads ask at the same time (flights).
func (a *Artifacts) openBlob(ctx context.Context, b blob) (*os.File, error) {
	if f, ok := a.cached(b); ok {
		return f, nil
	}
	err := a.flights.do(ctx, b.sum, func() error {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fillTimeout)
		defer cancel()
		return a.fill(ctx, b)
	})
	if err != nil {
		return nil, err
	}
	if f, ok := a.cached(b); ok {
		return f, nil
	}
	if b.gone != nil {
		if err := b.gone(ctx); err != nil {
			return nil, err // deleted on this replica since the fill
		}
	}
	return nil, fmt.Errorf("%s: cached bytes %s went away", b.name, b.sum)
}

// fill copies the bytes of b from the database into the cache: streamed
// to a temporary file while hashing, checked against b's size and
// SHA-256, made durable, and moved into place under the digest's lock while
// a row still has the digest (so that a delete on this replica either sees
// the file or is seen). Bytes that are not in the database are
// ErrUnavailable (ErrNotFound when b's row is gone); bytes that do not
// match are ErrCorrupt, and nothing is cached. Concurrent fills of one
// digest are run once (flights).
func (a *Artifacts) fill(ctx context.Context, b blob) error {
	if f, ok := a.cached(b); ok {
		f.Close() // filled by the flight before this one
		return nil
	}
	a.fills.Add(1)
	start := time.Now()
	tmp, err := os.CreateTemp(a.tmpDir(), cachePrefix)
	if err != nil {
		return fmt.Errorf("cache %s: %w", b.name, err)
	}
	defer os.Remove(tmp.Name())
	h := sha256.New()
	n, chunks, err := a.readChunks(ctx, b.sum, io.MultiWriter(tmp, h))
	if err == nil {
		err = tmp.Sync()
	}
	tmp.Close()
	got := hex.EncodeToString(h.Sum(nil))
	switch {
	case errors.Is(err, ErrCorrupt):
		a.log.Error("firmware bytes in the database are corrupt; not served", b.logKey, b.logID, "sha256", b.sum, "err", err)
		return fmt.Errorf("%s: %w", b.name, err)
	case err != nil:
		return fmt.Errorf("cache %s: %w", b.name, err)
	case chunks == 0:
		if b.gone != nil {
			if err := b.gone(ctx); err != nil {
				return err // deleted meanwhile: ErrNotFound
			}
		}
		return fmt.Errorf("%s (sha256 %s) has no bytes in the database nor on this replica: start the replica that received it, or upload it again: %w",
			b.name, b.sum, ErrUnavailable)
	case n != b.size || got != b.sum:
		a.log.Error("firmware bytes in the database do not match their record; not served",
			b.logKey, b.logID, "sha256", b.sum, "size", b.size, "got_sha256", got, "got_size", n)
		return fmt.Errorf("%s: the database holds %d bytes with SHA-256 %s, its record says %d bytes with %s: %w",
			b.name, n, got, b.size, b.sum, ErrCorrupt)
	}
	err = pgx.BeginFunc(ctx, a.pool, func(tx pgx.Tx) error {
		if err := lockDigest(ctx, tx, b.sum); err != nil {
			return err
		}
		if used, err := referenced(ctx, tx, b.sum); err != nil || !used {
			if err == nil {
				err = fmt.Errorf("%s: %w", b.name, ErrNotFound)
			}
			return err
		}
		return a.place(tmp.Name(), b.sum)
	})
	if err != nil {
		return fmt.Errorf("cache %s: %w", b.name, err)
	}
	a.log.Info("cached firmware bytes from the database", b.logKey, b.logID, "sha256", b.sum, "size", b.size,
		"duration", time.Since(start).Round(time.Millisecond).String())
	return nil
}

// flights runs one function per key at a time for every caller that asks
// while it runs, and gives them all its error. The function runs on its
// own: a caller that gives up (its context ends) does not stop it.
type flights struct {
	mu sync.Mutex
	m  map[string]*flight
}

type flight struct {
	done chan struct{}
	err  error
}

func (g *flights) do(ctx context.Context, key string, fn func() error) error {
	g.mu.Lock()
	f, ok := g.m[key]
	if !ok {
		if g.m == nil {
			g.m = map[string]*flight{}
		}
		f = &flight{done: make(chan struct{})}
		g.m[key] = f
		go func() {
			f.err = fn()
			g.mu.Lock()
			delete(g.m, key)
			g.mu.Unlock()
			close(f.done)
		}()
	}
	g.mu.Unlock()
	select {
	case <-f.done:
		return f.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// importLocal copies into the database the images of artifacts recorded
// before images lived there (they have no chunks) from this replica's files,
// each checked against its record, and logs one line per image: imported,
// corrupt (its file is removed), or unavailable here (another replica may
// hold it, and imports it when it starts). Replicas starting together import
// an image once: each decides under the digest's lock.
func (a *Artifacts) importLocal(ctx context.Context) error {
	type missing struct {
		sum  string
		size int64
		ids  []string
	}
	qctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	rows, err := a.pool.Query(qctx, `SELECT sha256, max(size), array_agg(id ORDER BY id) FROM firmware f
		WHERE NOT EXISTS (SELECT 1 FROM firmware_chunks c WHERE c.sha256 = f.sha256)
		GROUP BY sha256 ORDER BY sha256`)
	if err != nil {
		return fmt.Errorf("find images to import: %w", err)
	}
	todo, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (missing, error) {
		var m missing
		return m, row.Scan(&m.sum, &m.size, &m.ids)
	})
	if err != nil {
		return fmt.Errorf("find images to import: %w", err)
	}
	var errs []error
	for _, m := range todo {
		p := a.path(m.sum)
		st, err := os.Stat(p)
		if errors.Is(err, fs.ErrNotExist) {
			a.log.Warn("firmware image unavailable: not in the database and not in this replica's directory; downloads fail until the replica holding it starts, or it is uploaded again",
				"firmware", m.ids, "sha256", m.sum, "dir", a.dir)
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("import image %s: %w", m.sum, err))
			continue
		}
		start := time.Now()
		ictx, cancel := context.WithTimeout(ctx, fillTimeout)
		imported := false
		err = pgx.BeginFunc(ictx, a.pool, func(tx pgx.Tx) error {
			imported = false
			if err := lockDigest(ictx, tx, m.sum); err != nil {
				return err
			}
			if have, err := hasChunks(ictx, tx, m.sum); err != nil || have {
				return err // imported by another replica meanwhile
			}
			if used, err := referenced(ictx, tx, m.sum); err != nil || !used {
				return err // deleted meanwhile
			}
			imported = true
			if st.Size() != m.size {
				return fmt.Errorf("%s holds %d bytes, want %d: %w", p, st.Size(), m.size, ErrCorrupt)
			}
			return storeChunks(ictx, tx, m.sum, m.size, p)
		})
		cancel()
		switch {
		case errors.Is(err, ErrCorrupt):
			a.log.Error("firmware image not imported: its file does not match its record, and is removed; upload it again",
				"firmware", m.ids, "sha256", m.sum, "err", err)
			if err := os.Remove(p); err != nil {
				errs = append(errs, err)
			}
		case err != nil:
			errs = append(errs, fmt.Errorf("import image %s: %w", m.sum, err))
		case imported:
			a.log.Info("imported firmware image into the database", "firmware", m.ids, "sha256", m.sum, "size", m.size,
				"duration", time.Since(start).Round(time.Millisecond).String())
		}
	}
	return errors.Join(errs...)
}

// sweepCache removes the cached images whose digest no artifact (nor
// delta) has any more: deleted through another replica, which removes only
// its own file, or a delta whose build did not commit.
// Nothing else uses the directory yet, and a removed file is only a cache
// miss should the same bytes be uploaded again.
func (a *Artifacts) sweepCache(ctx context.Context) error {
	rows, err := a.pool.Query(ctx, `SELECT sha256 FROM firmware UNION SELECT sha256 FROM firmware_deltas WHERE sha256 IS NOT NULL`)
	if err != nil {
		return fmt.Errorf("sweep image cache: %w", err)
	}
	sums, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("sweep image cache: %w", err)
	}
	used := make(map[string]bool, len(sums))
	for _, s := range sums {
		used[s] = true
	}
	parents, err := os.ReadDir(a.dir)
	if err != nil {
		return err
	}
	var errs []error
	removed := 0
	for _, d := range parents {
		if !d.IsDir() || len(d.Name()) != 2 {
			continue
		}
		files, err := os.ReadDir(filepath.Join(a.dir, d.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, f := range files {
			sum := f.Name()
			if !isDigest(sum) || sum[:2] != d.Name() || used[sum] {
				continue // not ours, or still needed
			}
			if err := os.Remove(a.path(sum)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
				continue
			}
			removed++
		}
	}
	if removed > 0 {
		a.log.Info("removed cached firmware images of deleted artifacts", "count", removed)
	}
	return errors.Join(errs...)
}
