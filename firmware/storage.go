package firmware

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Image bytes live in the database (chunks.go); each replica caches them
// in files at dir/<sha256[:2]>/<sha256>, one file per digest however many
// artifacts have those bytes. Every change to a digest's chunks or to its
// file happens inside a transaction holding the digest's advisory lock
// (lockDigest): an upload stores the chunks (unless the digest has them)
// and moves its file into place after inserting its row and before
// committing; a delete decides that no other row has the digest, deletes
// the chunks and moves the file aside, after deleting its row and before
// committing; a download that fills the cache moves its file into place
// while a row has the digest. A decision is thus never made on rows that a
// concurrent transaction is about to commit, in this process or in another
// replica on the same database. Another replica's cached file of a deleted
// digest stays until that replica starts again (sweepCache); its downloads
// answer 404 meanwhile, as the row is gone.
//
// dir/tmp holds what is not settled yet, named so that a start-up after a
// crash knows what to do with it:
//
//	upload-*              an upload being received: removed
//	cache-*               an image being copied from the database: removed
//	pending-<sha256>-*    empty; an upload or a clean-up of that digest whose
//	                      outcome was not seen: settled (reconcile)
//	delete-<sha256>-*     an image a delete moved aside: put back if a row
//	                      still has the digest, else removed
const (
	uploadPrefix  = "upload-"
	cachePrefix   = "cache-"
	pendingPrefix = "pending-"
	deletePrefix  = "delete-"
)

// digestLocks is the first key of the advisory locks on digests ("fw" in
// ASCII); the second is hashtext(sha256). The two-key space is apart from
// the one-key locks of migrations. A hash collision only serialises two
// digests' changes.
const digestLocks = 0x6677

func lockDigest(ctx context.Context, tx pgx.Tx, sum string) error {
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, hashtext($2))`, digestLocks, sum); err != nil {
		return fmt.Errorf("lock image %s: %w", sum, err)
	}
	return nil
}

// referenced says whether an artifact or a built delta has the digest.
// Under lockDigest, in READ COMMITTED, it sees every row committed by a
// transaction that held the lock before.
func referenced(ctx context.Context, tx pgx.Tx, sum string) (bool, error) {
	var ok bool
	err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM firmware WHERE sha256 = $1)
		OR EXISTS (SELECT 1 FROM firmware_deltas WHERE sha256 = $1)`, sum).Scan(&ok)
	return ok, err
}

func (a *Artifacts) tmpDir() string { return filepath.Join(a.dir, "tmp") }

// place moves a file to the image path of sum, replacing what is there
// (the same bytes, by construction), and makes the move durable before the
// caller commits the row that needs it.
func (a *Artifacts) place(from, sum string) error {
	parent := filepath.Dir(a.path(sum))
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return err
	}
	if err := os.Rename(from, a.path(sum)); err != nil {
		return err
	}
	d, err := os.Open(parent)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// mark leaves a pending marker for sum: until it is removed, the next
// start-up reconciles the digest.
func (a *Artifacts) mark(sum string) (string, error) {
	f, err := os.CreateTemp(a.tmpDir(), pendingPrefix+sum+"-")
	if err != nil {
		return "", err
	}
	return f.Name(), f.Close()
}

// put records an upload, stores its bytes in the database and moves its
// file into place: the row is inserted (by record), then the chunks stored
// (streamed from the file, unless the digest has them already), then the
// file renamed, then the transaction committed, all under the digest's
// lock. When the record or the chunks fail nothing was moved and the caller
// removes its upload; when the commit fails (or its outcome is unknown) the
// digest is reconciled, so that the file stays only if a row has it. The
// chunks commit or roll back with the row.
func (a *Artifacts) put(ctx context.Context, upload, sum string, size int64, record func(pgx.Tx) error) error {
	marker, err := a.mark(sum)
	if err != nil {
		return fmt.Errorf("store upload: %w", err)
	}
	placed := false
	err = pgx.BeginFunc(ctx, a.pool, func(tx pgx.Tx) error {
		if err := lockDigest(ctx, tx, sum); err != nil {
			return err
		}
		if err := record(tx); err != nil {
			return err
		}
		if err := storeChunks(ctx, tx, sum, size, upload); err != nil {
			return err
		}
		placed = true // from here the file may be in place, or half way
		if err := a.place(upload, sum); err != nil {
			return fmt.Errorf("store upload: %w", err)
		}
		return nil
	})
	if err != nil && placed {
		if rerr := a.reconcile(context.WithoutCancel(ctx), sum, ""); rerr != nil {
			return errors.Join(err, rerr) // the marker stays for the next start
		}
	}
	os.Remove(marker)
	return err
}

// remove deletes an artifact's row, and in the same transaction, under the
// digest's lock, decides whether its chunks and its file go: only when no
// other row has the digest. The chunks go with the commit; the file is
// moved aside before the commit and removed after it; when the commit fails
// (or its outcome is unknown) the digest is reconciled, which puts the file
// back if the row is still there. keptBy runs first, with the row locked,
// and may refuse the delete.
func (a *Artifacts) remove(ctx context.Context, id string) error {
	var aside, sum string
	err := pgx.BeginFunc(ctx, a.pool, func(tx pgx.Tx) error {
		aside = ""
		art, err := scanArtifact(tx.QueryRow(ctx, `SELECT `+artifactColumns+` FROM firmware WHERE id = $1 FOR UPDATE`, id))
		if errors.Is(err, ErrNotFound) {
			return fmt.Errorf("firmware %s: %w", id, ErrNotFound)
		}
		if err != nil {
			return err
		}
		sum = art.SHA256
		if err := keptBy(ctx, tx, art); err != nil {
			return err
		}
		if err := lockDigest(ctx, tx, sum); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM firmware WHERE id = $1`, id); err != nil {
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code == "23503" { // referenced by a row keptBy does not know
				return fmt.Errorf("firmware %s is still referenced (%s): %w", id, pgErr.ConstraintName, ErrConflict)
			}
			return err
		}
		if err := dropDeltas(ctx, tx, sum); err != nil {
			return err
		}
		if used, err := referenced(ctx, tx, sum); err != nil || used {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM firmware_chunks WHERE sha256 = $1`, sum); err != nil {
			return fmt.Errorf("remove image %s: %w", sum, err)
		}
		p := filepath.Join(a.tmpDir(), deletePrefix+sum+"-"+newID("")[1:])
		switch err := os.Rename(a.path(sum), p); {
		case errors.Is(err, fs.ErrNotExist):
			return nil
		case err != nil:
			return fmt.Errorf("remove image %s: %w", sum, err)
		}
		aside = p
		return nil
	})
	if aside == "" {
		return err
	}
	if err != nil {
		if rerr := a.reconcile(context.WithoutCancel(ctx), sum, aside); rerr != nil {
			return errors.Join(err, rerr)
		}
		return err
	}
	os.Remove(aside)
	return nil
}

// dropDeltas deletes, once no artifact has the image sum any more, the
// deltas from or to it, and the chunks of each delta no other row names
// (under the delta's lock; a delta being built holds its row, so this
// waits for the build to commit, then deletes it). The cached files of such
// a delta stay until their replica starts again (sweepCache); nothing
// serves them meanwhile, as their row is gone.
// The caller holds the image's lock.
func dropDeltas(ctx context.Context, tx pgx.Tx, sum string) error {
	var left bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM firmware WHERE sha256 = $1)`, sum).Scan(&left); err != nil || left {
		return err
	}
	rows, err := tx.Query(ctx, `DELETE FROM firmware_deltas WHERE base_sha256 = $1 OR target_sha256 = $1 RETURNING coalesce(sha256, '')`, sum)
	if err != nil {
		return err
	}
	sums, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("remove deltas of %s: %w", sum, err)
	}
	for _, d := range sums {
		if d == "" {
			continue
		}
		if err := lockDigest(ctx, tx, d); err != nil {
			return err
		}
		if used, err := referenced(ctx, tx, d); err != nil || used {
			if err != nil {
				return err
			}
			continue
		}
		if _, err := tx.Exec(ctx, `DELETE FROM firmware_chunks WHERE sha256 = $1`, d); err != nil {
			return fmt.Errorf("remove delta %s: %w", d, err)
		}
	}
	return nil
}

// reconcile settles a digest whose last change was not seen to commit:
// under its lock, the image file stays (or, from aside, goes back) when a
// row has the digest, and goes otherwise, with any chunk left of it (there
// should be none: chunks commit with rows). When the database cannot say, an
// image moved aside goes back where rows look for it, with a marker so that
// the next start-up tries again (a file too many, never one too few); the
// caller keeps its own marker, if it has one.
func (a *Artifacts) reconcile(ctx context.Context, sum, aside string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err := pgx.BeginFunc(ctx, a.pool, func(tx pgx.Tx) error {
		if err := lockDigest(ctx, tx, sum); err != nil {
			return err
		}
		used, err := referenced(ctx, tx, sum)
		if err != nil {
			return err
		}
		if !used {
			if _, err := tx.Exec(ctx, `DELETE FROM firmware_chunks WHERE sha256 = $1`, sum); err != nil {
				return err
			}
			if err := os.Remove(a.path(sum)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			return nil
		}
		if _, err := os.Stat(a.path(sum)); aside != "" && errors.Is(err, fs.ErrNotExist) {
			return a.place(aside, sum)
		}
		return nil
	})
	if err == nil {
		if aside != "" {
			os.Remove(aside)
		}
		return nil
	}
	if _, serr := os.Stat(aside); aside != "" && serr == nil {
		_, merr := a.mark(sum)
		if perr := a.place(aside, sum); perr != nil || merr != nil {
			return fmt.Errorf("settle image %s: %w (its bytes are in %s)", sum, errors.Join(err, perr, merr), aside)
		}
	}
	return fmt.Errorf("settle image %s: %w", sum, err)
}

// recoverTmp clears what a crash left in dir/tmp (see the list above):
// uploads go, and every digest a marker or an image moved aside names is
// reconciled. A pending marker goes once its digest is settled.
func (a *Artifacts) recoverTmp(ctx context.Context) error {
	entries, err := os.ReadDir(a.tmpDir())
	if err != nil {
		return err
	}
	settled := map[string]bool{}
	var errs []error
	for _, e := range entries {
		name, p := e.Name(), filepath.Join(a.tmpDir(), e.Name())
		if sum, ok := markedDigest(name, deletePrefix); ok {
			if err := a.reconcile(ctx, sum, p); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		sum, pending := markedDigest(name, pendingPrefix)
		switch {
		case pending && !settled[sum]:
			if err := a.reconcile(ctx, sum, ""); err != nil {
				errs = append(errs, err)
				continue
			}
			settled[sum] = true
		case pending:
		case strings.HasPrefix(name, uploadPrefix), strings.HasPrefix(name, cachePrefix):
		default:
			continue // not ours
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// markedDigest returns the SHA-256 that a file name of dir/tmp carries after
// prefix, if it carries one.
func markedDigest(name, prefix string) (string, bool) {
	rest, ok := strings.CutPrefix(name, prefix)
	if !ok || len(rest) < 65 || rest[64] != '-' {
		return "", false
	}
	sum := rest[:64]
	return sum, isDigest(sum)
}

// isDigest says whether s is a SHA-256 as images are named: 64 lower-case
// hex digits.
func isDigest(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil && len(s) == 64 && strings.ToLower(s) == s
}

// mayRollBack says whether a campaign in state s may still send its devices
// back to the firmware they ran before: an operator may roll it back from
// s, or it is rolling back. A draft has selected no device yet.
func mayRollBack(s CampaignState) bool {
	return s == StateRollingBack || slices.Contains(Actions(s), ActRollback)
}

// campaignStates lists every campaign state.
var campaignStates = []CampaignState{StateDraft, StateRunning, StateAwaitingApproval, StatePaused, StateRollingBack, StateCompleted, StateAborted, StateRolledBack}

// rollbackStates are the states in which mayRollBack holds, for SQL.
func rollbackStates() []string {
	var out []string
	for _, s := range campaignStates {
		if mayRollBack(s) {
			out = append(out, string(s))
		}
	}
	return out
}

// keptBy refuses to delete art while a campaign needs it: as its target,
// or as the image a device it selected rolls back to (the artifact of the
// device's model and the version it ran before the campaign) while the
// campaign may still roll back. Drafts are locked first: a draft being
// started selects its devices in its own transaction, which then commits
// before this check reads them, or waits for this delete. The error wraps
// ErrConflict and names the campaign.
func keptBy(ctx context.Context, tx pgx.Tx, art Artifact) error {
	if _, err := tx.Exec(ctx, `SELECT 1 FROM campaigns WHERE state = $1 FOR SHARE`, string(StateDraft)); err != nil {
		return err
	}
	var id, state string
	var n int
	err := tx.QueryRow(ctx, `SELECT id, state, count(*) OVER () FROM campaigns WHERE firmware_id = $1
		ORDER BY created_at, id LIMIT 1`, art.ID).Scan(&id, &state, &n)
	switch {
	case err == nil:
		return fmt.Errorf("firmware %s is the target of campaign %s (%s)%s: %w", art.ID, id, state, more(n), ErrConflict)
	case !errors.Is(err, pgx.ErrNoRows):
		return err
	}
	err = tx.QueryRow(ctx, `SELECT c.id, c.state, count(*) OVER () FROM campaigns c
		WHERE c.state = ANY($2) AND EXISTS (
			SELECT 1 FROM campaign_devices cd
			JOIN devices d ON d.id = cd.device_id
			JOIN firmware_models fm ON fm.model = d.model AND fm.version = cd.from_version
			WHERE cd.campaign_id = c.id AND fm.firmware_id = $1)
		ORDER BY c.created_at, c.id LIMIT 1`, art.ID, rollbackStates()).Scan(&id, &state, &n)
	switch {
	case err == nil:
		return fmt.Errorf("firmware %s is the rollback image of campaign %s (%s)%s: %w", art.ID, id, state, more(n), ErrConflict)
	case !errors.Is(err, pgx.ErrNoRows):
		return err
	}
	return nil
}

func more(n int) string {
	if n <= 1 {
		return ""
	}
	return fmt.Sprintf(" and %d more", n-1)
}
