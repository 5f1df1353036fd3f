// Package firmware holds firmware artifacts (images stored in PostgreSQL by
// SHA-256, cached in content-addressed files, with an ed25519 signature), the
// OTA job protocol, and staged rollout campaigns with their state machine and
// dispatcher. It owns its PostgreSQL tables.
package firmware

import (
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/firmware/manifest"
)

// Sentinel errors, mapped to HTTP statuses by the web layer.
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("conflict")
	// ErrUnavailable is an artifact whose image is neither in the database
	// nor cached on this replica: one recorded before images lived in the
	// database, whose file is on a replica that has not started since.
	ErrUnavailable = errors.New("image unavailable")
	// ErrCorrupt is an image whose bytes do not match its artifact's size
	// and SHA-256. It is never served.
	ErrCorrupt = errors.New("image corrupt")
)

// ValidationError names the request field that is wrong.
type ValidationError struct {
	Field string
	Msg   string
}

func (e *ValidationError) Error() string     { return e.Field + ": " + e.Msg }
func (e *ValidationError) FieldName() string { return e.Field }

func invalid(field, format string, a ...any) error {
	return &ValidationError{Field: field, Msg: fmt.Sprintf(format, a...)}
}

// Artifact is an uploaded firmware image.
type Artifact struct {
	ID        string    `json:"id"`
	Version   string    `json:"version"`
	Models    []string  `json:"models"`
	SHA256    string    `json:"sha256"`
	Size      int64     `json:"size"`
	Signature string    `json:"signature"` // base64 ed25519 of the raw SHA-256 digest
	SignedBy  string    `json:"signed_by"` // "server" or the trusted key's fingerprint
	Notes     string    `json:"notes"`
	CreatedAt time.Time `json:"created_at"`
}

// NewArtifact describes an upload.
type NewArtifact struct {
	Version string
	Models  []string
	Notes   string
	// Signature, when given, is a base64 ed25519 signature of the image's
	// SHA-256 digest made by a trusted key; otherwise the server signs.
	Signature string
}

// Keys are the ed25519 keys of firmware signing: the server's own, and the
// public keys whose signatures uploads may carry instead.
type Keys struct {
	Signing ed25519.PrivateKey
	Trusted []ed25519.PublicKey
}

// Fingerprint names a public key: the first 8 bytes of its SHA-256, hex.
func Fingerprint(k ed25519.PublicKey) string {
	sum := sha256.Sum256(k)
	return hex.EncodeToString(sum[:8])
}

// Artifacts stores firmware images: records and bytes in PostgreSQL (bytes
// in chunks by SHA-256, chunks.go), and a cache of the bytes under dir by
// SHA-256, so that every replica on the database serves every image.
type Artifacts struct {
	pool *pgxpool.Pool
	dir  string
	keys Keys
	// urlKey signs short-lived download URLs.
	urlKey []byte
	log    *slog.Logger
	// flights fills the cache once per digest however many downloads ask.
	flights flights
	// fills counts the images copied from the database into the cache.
	fills atomic.Int64
}

// ArtifactOption configures NewArtifacts.
type ArtifactOption func(*Artifacts)

// WithLogger names where the store reports what it does with images on its
// own: images imported into the database or unavailable at start-up, the
// cache filled, an image found corrupt. Without it, nowhere.
func WithLogger(l *slog.Logger) ArtifactOption { return func(a *Artifacts) { a.log = l } }

// NewArtifacts opens the artifact store and clears what a crash left in its
// temporary directory (see storage.go): partial uploads go, and an upload or
// delete that was in flight is settled against the database. Then it
// imports into the database the images of artifacts recorded before images
// lived there, from the files of this replica (importLocal), and removes
// cached images that no artifact has any more (sweepCache). urlKey signs
// download URLs and must be shared by replicas (fleetd derives it from the
// token pepper).
func NewArtifacts(pool *pgxpool.Pool, dir string, keys Keys, urlKey []byte, opts ...ArtifactOption) (*Artifacts, error) {
	if len(keys.Signing) != ed25519.PrivateKeySize {
		return nil, errors.New("firmware signing key missing")
	}
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o700); err != nil {
		return nil, err
	}
	a := &Artifacts{pool: pool, dir: dir, keys: keys, urlKey: urlKey, log: slog.New(slog.DiscardHandler)}
	for _, o := range opts {
		o(a)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := a.recoverTmp(ctx); err != nil {
		return nil, fmt.Errorf("recover firmware storage: %w", err)
	}
	// Each image has its own deadline (fillTimeout): a large import must
	// not run out of the recovery's minute.
	if err := a.importLocal(context.Background()); err != nil {
		return nil, fmt.Errorf("import firmware images into the database: %w", err)
	}
	if err := a.sweepCache(ctx); err != nil {
		return nil, err
	}
	return a, nil
}

// PublicKey is the key devices verify server-signed images with.
func (a *Artifacts) PublicKey() ed25519.PublicKey { return a.keys.Signing.Public().(ed25519.PublicKey) }

func (a *Artifacts) path(sum string) string { return filepath.Join(a.dir, sum[:2], sum) }

// Create streams an image to a temporary file (never whole in memory),
// hashing it on the way, signs it (or checks the uploaded signature), and
// records it; the bytes go into the database (streamed from the file, one
// chunk at a time) and the file moves into this replica's cache only with
// its row (put), so a refused or failed upload leaves nothing behind. A
// version that already exists for one of the models is ErrConflict.
func (a *Artifacts) Create(ctx context.Context, n NewArtifact, body io.Reader) (Artifact, error) {
	if n.Version == "" || len(n.Version) > 64 || strings.ContainsAny(n.Version, " /\\") {
		return Artifact{}, invalid("version", "is required: 1 to 64 characters, no spaces or slashes")
	}
	if len(n.Models) == 0 {
		return Artifact{}, invalid("models", "name at least one device model")
	}
	for i, m := range n.Models {
		if m == "" || len(m) > 64 || strings.ContainsAny(m, " /\\") {
			return Artifact{}, invalid(fmt.Sprintf("models[%d]", i), "is not a model name")
		}
	}
	tmp, err := os.CreateTemp(a.tmpDir(), uploadPrefix)
	if err != nil {
		return Artifact{}, err
	}
	defer os.Remove(tmp.Name())
	h := sha256.New()
	size, err := io.Copy(io.MultiWriter(tmp, h), body)
	if err == nil {
		err = tmp.Sync()
	}
	tmp.Close()
	if err != nil {
		return Artifact{}, fmt.Errorf("store upload: %w", err)
	}
	if size == 0 {
		return Artifact{}, invalid("file", "is empty")
	}
	digest := h.Sum(nil)
	art := Artifact{Version: n.Version, Models: n.Models, SHA256: hex.EncodeToString(digest), Size: size, Notes: n.Notes}
	// The signature covers what the image is (digest, size, version,
	// models: manifest.Image), so a signed image cannot be passed off as
	// another version or for another model.
	if n.Signature != "" {
		if _, err := base64.StdEncoding.DecodeString(n.Signature); err != nil {
			return Artifact{}, invalid("signature", "is not base64")
		}
		k, err := manifest.VerifyImage(a.keys.Trusted, art.Manifest(), n.Signature)
		if err != nil {
			return Artifact{}, invalid("signature", "does not verify with any trusted key (FLEETD_FIRMWARE_TRUSTED_KEYS_FILE): it must sign the image manifest (sha256, size, version, models)")
		}
		art.Signature, art.SignedBy = n.Signature, Fingerprint(k)
	} else {
		art.Signature, art.SignedBy = manifest.SignImage(a.keys.Signing, art.Manifest()), "server"
	}
	art.ID = newID("fw")
	err = a.put(ctx, tmp.Name(), art.SHA256, art.Size, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `INSERT INTO firmware (id, version, models, sha256, size, signature, signed_by, notes)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING created_at`,
			art.ID, art.Version, art.Models, art.SHA256, art.Size, art.Signature, art.SignedBy, art.Notes).Scan(&art.CreatedAt); err != nil {
			return err
		}
		for _, m := range art.Models {
			if _, err := tx.Exec(ctx, `INSERT INTO firmware_models (firmware_id, model, version) VALUES ($1, $2, $3)`, art.ID, m, art.Version); err != nil {
				return err
			}
		}
		return nil
	})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" {
		return Artifact{}, fmt.Errorf("firmware %s already exists for one of %v: %w", art.Version, art.Models, ErrConflict)
	}
	if err != nil {
		return Artifact{}, fmt.Errorf("record firmware: %w", err)
	}
	return art, nil
}

const artifactColumns = `id, version, models, sha256, size, signature, signed_by, notes, created_at`

func scanArtifact(row pgx.Row) (Artifact, error) {
	var a Artifact
	err := row.Scan(&a.ID, &a.Version, &a.Models, &a.SHA256, &a.Size, &a.Signature, &a.SignedBy, &a.Notes, &a.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return a, ErrNotFound
	}
	return a, err
}

// Get returns one artifact.
func (a *Artifacts) Get(ctx context.Context, id string) (Artifact, error) {
	art, err := scanArtifact(a.pool.QueryRow(ctx, `SELECT `+artifactColumns+` FROM firmware WHERE id = $1`, id))
	if errors.Is(err, ErrNotFound) {
		return art, fmt.Errorf("firmware %s: %w", id, ErrNotFound)
	}
	return art, err
}

// ForModel returns the artifact of a version for a model (rollback needs it).
func (a *Artifacts) ForModel(ctx context.Context, model, version string) (Artifact, error) {
	art, err := scanArtifact(a.pool.QueryRow(ctx, `SELECT `+artifactColumns+` FROM firmware
		WHERE id = (SELECT firmware_id FROM firmware_models WHERE model = $1 AND version = $2)`, model, version))
	if errors.Is(err, ErrNotFound) {
		return art, fmt.Errorf("no firmware %s for model %s: %w", version, model, ErrNotFound)
	}
	return art, err
}

// List returns every artifact, newest first.
func (a *Artifacts) List(ctx context.Context) ([]Artifact, error) {
	rows, err := a.pool.Query(ctx, `SELECT `+artifactColumns+` FROM firmware ORDER BY created_at DESC, id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []Artifact{}
	for rows.Next() {
		art, err := scanArtifact(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, art)
	}
	return out, rows.Err()
}

// Delete removes an artifact that no campaign needs: one that is the target
// of a campaign, or the image a campaign that may still roll back sends
// some of its devices back to, is ErrConflict naming the campaign. Its file
// goes when no other artifact has the same bytes, decided under the
// digest's lock so that a concurrent upload of those bytes keeps its file.
// An unknown id is ErrNotFound.
func (a *Artifacts) Delete(ctx context.Context, id string) error {
	return a.remove(ctx, id)
}

// Open opens an artifact's bytes for download, from this replica's cache,
// which it first fills from the database if need be (fill: once however
// many downloads ask at the same time). An unknown id is ErrNotFound; an
// image that is nowhere is ErrUnavailable; one whose bytes in the database
// do not match the artifact is ErrCorrupt, and is not cached.
func (a *Artifacts) Open(ctx context.Context, id string) (Artifact, *os.File, error) {
	art, err := a.Get(ctx, id)
	if err != nil {
		return art, nil, err
	}
	f, err := a.openBlob(ctx, art.blob(a))
	return art, f, err
}

// SignURL returns the query of a download URL for one job of one device
// that expires at exp (the job's manifest expiry): a URL is worth nothing to
// another device, for another job, or after its job could still run.
func (a *Artifacts) SignURL(artifactID, deviceID, jobID string, exp time.Time) string {
	e := strconv.FormatInt(exp.Unix(), 10)
	return "device=" + url.QueryEscape(deviceID) + "&job=" + url.QueryEscape(jobID) + "&expires=" + e +
		"&sig=" + a.urlMAC(artifactID, deviceID, jobID, e)
}

// CheckURL verifies a signed download URL.
func (a *Artifacts) CheckURL(artifactID, deviceID, jobID, expires, sig string, now time.Time) error {
	e, err := strconv.ParseInt(expires, 10, 64)
	if err != nil || deviceID == "" || jobID == "" {
		return errors.New("malformed signed URL")
	}
	if now.Unix() > e {
		return errors.New("signed URL expired")
	}
	if !hmac.Equal([]byte(sig), []byte(a.urlMAC(artifactID, deviceID, jobID, expires))) {
		return errors.New("bad signature")
	}
	return nil
}

func (a *Artifacts) urlMAC(artifactID, deviceID, jobID, expires string) string {
	m := hmac.New(sha256.New, a.urlKey)
	fmt.Fprintf(m, "%s\n%s\n%s\n%s", artifactID, deviceID, jobID, expires)
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

func newID(prefix string) string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return prefix + "_" + hex.EncodeToString(b)
}
