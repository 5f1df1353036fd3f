package firmware

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/pgtest"
)

// newStore is an artifact store over a per-test database and directory.
func newStore(t *testing.T) (*Artifacts, *pgxpool.Pool, string) {
	t.Helper()
	pool := pgtest.New(t)
	dir := t.TempDir()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	a, err := NewArtifacts(pool, dir, Keys{Signing: key}, []byte("url-key"))
	if err != nil {
		t.Fatal(err)
	}
	return a, pool, dir
}

// storedFiles lists every file under dir, relative and sorted: temporary
// files and orphans show up here.
func storedFiles(t *testing.T, dir string) []string {
	t.Helper()
	files := []string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		files = append(files, filepath.ToSlash(rel))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(files)
	return files
}

// wantFiles checks that dir holds exactly the images of the artifacts in
// the database: no orphan, no temporary file, none missing; and that the
// database holds the chunks of exactly those images.
func wantFiles(t *testing.T, a *Artifacts, dir string) {
	t.Helper()
	arts, err := a.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want, sums := []string{}, []string{}
	for _, art := range arts {
		if f := art.SHA256[:2] + "/" + art.SHA256; !slices.Contains(want, f) {
			want = append(want, f)
			sums = append(sums, art.SHA256)
		}
	}
	slices.Sort(want)
	if diff := cmp.Diff(want, storedFiles(t, dir)); diff != "" {
		t.Fatalf("stored files mismatch (-want +got):\n%s", diff)
	}
	slices.Sort(sums)
	if diff := cmp.Diff(sums, chunkDigests(t, a.pool)); diff != "" {
		t.Fatalf("images in the database mismatch (-want +got):\n%s", diff)
	}
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func TestMayRollBack(t *testing.T) {
	want := map[CampaignState]bool{
		StateDraft:            false, // no device selected yet
		StateRunning:          true,
		StatePaused:           true,
		StateAwaitingApproval: true, // devices of earlier stages were upgraded
		StateCompleted:        true,
		StateAborted:          true,
		StateRollingBack:      true,
		StateRolledBack:       false,
	}
	for s, w := range want {
		if got := mayRollBack(s); got != w {
			t.Errorf("mayRollBack(%s) = %v, want %v", s, got, w)
		}
		// The SQL that guards DELETE knows every state.
		if got := slices.Contains(rollbackStates(), string(s)); got != w {
			t.Errorf("rollbackStates() holds %s: %v, want %v", s, got, w)
		}
	}
}

// A refused or failed upload leaves nothing on disk: not its image, not a
// temporary file. One that fails with the bytes of a stored image keeps
// that image.
func TestUploadLeavesNoOrphan(t *testing.T) {
	a, pool, dir := newStore(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `
		CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
		CREATE CONSTRAINT TRIGGER refuse_doomed AFTER INSERT ON firmware DEFERRABLE INITIALLY DEFERRED
			FOR EACH ROW WHEN (NEW.version LIKE 'doomed%') EXECUTE FUNCTION refuse();`); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, strings.NewReader("first image")); err != nil {
		t.Fatal(err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	cases := []struct {
		name  string
		ctx   context.Context
		n     NewArtifact
		image string
		is    error // nil: any error
	}{
		{"same version twice", ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, "another image", ErrConflict},
		{"same version twice, same bytes", ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, "first image", ErrConflict},
		{"version taken for one model", ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-200", "gw-100"}}, "third image", ErrConflict},
		{"cancelled request", cancelled, NewArtifact{Version: "1.0.1", Models: []string{"gw-100"}}, "cancelled image", context.Canceled},
		{"commit refused", ctx, NewArtifact{Version: "doomed-1", Models: []string{"gw-100"}}, "doomed image", nil},
		{"commit refused, same bytes", ctx, NewArtifact{Version: "doomed-2", Models: []string{"gw-100"}}, "first image", nil},
		{"empty", ctx, NewArtifact{Version: "1.0.2", Models: []string{"gw-100"}}, "", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := a.Create(c.ctx, c.n, strings.NewReader(c.image))
			if err == nil || c.is != nil && !errors.Is(err, c.is) {
				t.Fatalf("got %v, want %v", err, c.is)
			}
			wantFiles(t, a, dir)
		})
	}
	if _, err := os.Stat(a.path(digestOf([]byte("first image")))); err != nil {
		t.Fatalf("the stored image went with a failed upload of the same bytes: %v", err)
	}
}

// A delete whose commit fails keeps the row and its file.
func TestDeleteFailedCommitKeepsFile(t *testing.T) {
	a, pool, dir := newStore(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `
		CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
		CREATE CONSTRAINT TRIGGER refuse_delete AFTER DELETE ON firmware DEFERRABLE INITIALLY DEFERRED
			FOR EACH ROW EXECUTE FUNCTION refuse();`); err != nil {
		t.Fatal(err)
	}
	art, err := a.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, strings.NewReader("kept image"))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Delete(ctx, art.ID); err == nil {
		t.Fatal("delete succeeded despite the refused commit")
	}
	if _, err := a.Get(ctx, art.ID); err != nil {
		t.Fatal(err)
	}
	wantFiles(t, a, dir)
	if _, err := pool.Exec(ctx, `DROP TRIGGER refuse_delete ON firmware`); err != nil {
		t.Fatal(err)
	}
	if err := a.Delete(ctx, art.ID); err != nil {
		t.Fatal(err)
	}
	wantFiles(t, a, dir)
	if err := a.Delete(ctx, art.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v, want ErrNotFound", err)
	}
}

// Uploading the bytes of an image while it is deleted keeps the file of
// whichever row survives.
func TestDeleteRacingUploadOfSameBytes(t *testing.T) {
	a, _, dir := newStore(t)
	ctx := context.Background()
	image := []byte("one image, many versions")
	old, err := a.Create(ctx, NewArtifact{Version: "v0", Models: []string{"gw-100"}}, bytes.NewReader(image))
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 100; i++ {
		var wg sync.WaitGroup
		var created Artifact
		var createErr, deleteErr error
		wg.Add(2)
		go func() {
			defer wg.Done()
			created, createErr = a.Create(ctx, NewArtifact{Version: fmt.Sprintf("v%d", i), Models: []string{"gw-100"}}, bytes.NewReader(image))
		}()
		go func() {
			defer wg.Done()
			deleteErr = a.Delete(ctx, old.ID)
		}()
		wg.Wait()
		if createErr != nil || deleteErr != nil {
			t.Fatalf("iteration %d: create %v, delete %v", i, createErr, deleteErr)
		}
		arts, err := a.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, art := range arts {
			if _, err := os.Stat(a.path(art.SHA256)); err != nil {
				t.Fatalf("iteration %d: %s (%s) lost its file: %v", i, art.ID, art.Version, err)
			}
			if diff := cmp.Diff([]string{art.SHA256}, chunkDigests(t, a.pool)); diff != "" {
				t.Fatalf("iteration %d: images in the database mismatch (-want +got):\n%s", i, diff)
			}
		}
		old = created
	}
	wantFiles(t, a, dir)
}

// A crash leaves temporary files; the next start removes uploads, settles
// digests whose upload or delete was in flight, and keeps what rows need.
func TestStartupRecovery(t *testing.T) {
	a, pool, dir := newStore(t)
	ctx := context.Background()
	kept, err := a.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, strings.NewReader("kept image"))
	if err != nil {
		t.Fatal(err)
	}
	write := func(p, content string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tmp := filepath.Join(dir, "tmp")
	// An upload cut off while streaming.
	write(filepath.Join(tmp, "upload-123"), "half an im")
	// An upload moved into place whose commit never happened.
	lost := digestOf([]byte("lost image"))
	write(a.path(lost), "lost image")
	write(filepath.Join(tmp, "pending-"+lost+"-1"), "")
	// A delete that moved the image aside and then crashed before its
	// commit: the row is still there, the image goes back.
	if err := os.Rename(a.path(kept.SHA256), filepath.Join(tmp, "delete-"+kept.SHA256+"-2")); err != nil {
		t.Fatal(err)
	}
	// A delete that committed and crashed before removing the image.
	gone := digestOf([]byte("deleted image"))
	write(filepath.Join(tmp, "delete-"+gone+"-3"), "deleted image")
	// Something that is not ours stays.
	write(filepath.Join(tmp, "README"), "not ours")

	_, key, _ := ed25519.GenerateKey(rand.Reader)
	if _, err := NewArtifacts(pool, dir, Keys{Signing: key}, []byte("url-key")); err != nil {
		t.Fatal(err)
	}
	want := []string{kept.SHA256[:2] + "/" + kept.SHA256, "tmp/README"}
	if diff := cmp.Diff(want, storedFiles(t, dir)); diff != "" {
		t.Fatalf("after start-up (-want +got):\n%s", diff)
	}
}

// An image that a campaign may still send devices back to cannot be
// deleted; once the campaign has rolled back, it can.
func TestDeleteRollbackImage(t *testing.T) {
	d := newDispatcher(t, "gw-1")
	ctx := context.Background()
	arts := d.c.artifacts
	old, err := arts.ForModel(ctx, "gw-100", "1.0.0")
	if err != nil {
		t.Fatal(err)
	}
	// 1.0.0 of another model is not what gw-1 rolls back to.
	otherModel, err := arts.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-200"}}, strings.NewReader("old image of another model"))
	if err != nil {
		t.Fatal(err)
	}
	draft, err := d.c.Create(ctx, Spec{Name: "draft", FirmwareID: d.target.ID, Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1}),
		DeviceTimeout: Duration(10 * time.Minute)}, "test")
	if err != nil {
		t.Fatal(err)
	}
	wantRefused := func(id, campaign, why string) {
		t.Helper()
		err := arts.Delete(ctx, id)
		if !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), campaign) || !strings.Contains(err.Error(), why) {
			t.Fatalf("delete %s: %v; want ErrConflict naming %s (%s)", id, err, campaign, why)
		}
		if _, err := arts.Get(ctx, id); err != nil {
			t.Fatalf("refused delete removed %s: %v", id, err)
		}
	}
	// A draft has selected no device: nothing to roll back yet.
	wantRefused(d.target.ID, draft.ID, "target")

	v := d.start(Spec{Name: "back", Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1})})
	wantRefused(old.ID, v.ID, "rollback image")
	wantRefused(old.ID, v.ID, string(StateRunning))
	for _, s := range []CampaignState{StatePaused, StateAborted, StateCompleted, StateRollingBack} {
		if _, err := d.pool.Exec(ctx, `UPDATE campaigns SET state = $2 WHERE id = $1`, v.ID, string(s)); err != nil {
			t.Fatal(err)
		}
		wantRefused(old.ID, v.ID, string(s))
	}
	if _, err := d.pool.Exec(ctx, `UPDATE campaigns SET state = 'running' WHERE id = $1`, v.ID); err != nil {
		t.Fatal(err)
	}
	if err := arts.Delete(ctx, otherModel.ID); err != nil {
		t.Fatalf("delete 1.0.0 of gw-200 while gw-100 devices may roll back to 1.0.0: %v", err)
	}

	// Through the whole life of the campaign: completed, rolling back, rolled back.
	d.step(time.Second)
	forward := d.device(v.ID, "gw-1").JobID
	d.report("gw-1", forward, "rebooting", 100, "")
	d.c.DeviceBirth("gw-1", "2.0.0")
	d.c.handleNotes(ctx)
	d.step(time.Second)
	if s := d.state(v.ID); s != StateCompleted {
		t.Fatalf("campaign %s, want completed", s)
	}
	wantRefused(old.ID, v.ID, string(StateCompleted))
	if _, err := d.c.Act(ctx, v.ID, ActRollback, "test"); err != nil {
		t.Fatal(err)
	}
	d.step(time.Second)
	wantRefused(old.ID, v.ID, string(StateRollingBack))
	jobs := d.send.jobs()
	d.report("gw-1", jobs[len(jobs)-1].JobID, "rebooting", 100, "")
	d.c.DeviceBirth("gw-1", "1.0.0")
	d.c.handleNotes(ctx)
	d.step(time.Second)
	if s := d.state(v.ID); s != StateRolledBack {
		t.Fatalf("campaign %s, want rolled_back", s)
	}
	if err := arts.Delete(ctx, old.ID); err != nil {
		t.Fatalf("delete the rollback image of a rolled-back campaign: %v", err)
	}
}
