package fleet

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// twoReplicas returns two services on one database, as two fleetd replicas
// have, each with its own cache.
func twoReplicas(t *testing.T) (a, b *Service) {
	t.Helper()
	a, pool := newService(t)
	h, err := NewHasher([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	return a, NewService(NewStore(pool), h, nil)
}

func authResult(t *testing.T, s *Service, id, token string) AuthResult {
	t.Helper()
	info, err := s.Authenticate(context.Background(), id, []byte(token))
	if err != nil {
		t.Fatal(err)
	}
	return info.Result
}

// TestCredentialChangesAcrossReplicas: a replica's cache follows another's
// writes once told (CredentialChanged, what the bus delivers); a revocation
// also ends the session there; and OnCredentialChange says what to tell.
func TestCredentialChangesAcrossReplicas(t *testing.T) {
	ctx := context.Background()
	a, b := twoReplicas(t)
	var mu sync.Mutex
	var told []string
	a.OnCredentialChange(func(id string, change CredentialChange) {
		mu.Lock()
		defer mu.Unlock()
		told = append(told, id+" "+string(change))
	})
	kicked := make(chan string, 2)
	b.OnRevoke(func(id string) { kicked <- "decommissioned " + id })
	b.OnRotate(func(id string) { kicked <- "rotated " + id })

	_, old, err := a.Register(ctx, NewDevice{ID: "gw-1", Model: "gw-100"})
	if err != nil {
		t.Fatal(err)
	}
	if got := authResult(t, b, "gw-1", old); got != AuthOK { // b caches it
		t.Fatalf("replica b before the rotation: %v", got)
	}
	fresh, err := a.RotateToken(ctx, "gw-1")
	if err != nil {
		t.Fatal(err)
	}
	if got := authResult(t, b, "gw-1", old); got != AuthOK {
		t.Fatalf("replica b answers from its cache until told: %v", got)
	}
	b.CredentialChanged("gw-1", CredentialRotated)
	if id := waitKick(t, kicked); id != "rotated gw-1" {
		t.Fatalf("replica b, told of the rotation, ended %q", id)
	}
	if got := authResult(t, b, "gw-1", old); got != AuthBadToken {
		t.Fatalf("replica b, told of the rotation, old token: %v", got)
	}
	if got := authResult(t, b, "gw-1", fresh); got != AuthOK {
		t.Fatalf("replica b, told of the rotation, new token: %v", got)
	}
	if _, err := a.Decommission(ctx, "gw-1"); err != nil {
		t.Fatal(err)
	}
	b.CredentialChanged("gw-1", CredentialRevoked)
	if id := waitKick(t, kicked); id != "decommissioned gw-1" {
		t.Fatalf("replica b, told of the decommission, ended %q", id)
	}
	if got := authResult(t, b, "gw-1", fresh); got != AuthDecommissioned {
		t.Fatalf("replica b after the decommission: %v", got)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"gw-1 updated", "gw-1 rotated", "gw-1 revoked"}; len(told) != 3 || told[0] != want[0] || told[1] != want[1] || told[2] != want[2] {
		t.Fatalf("replica a told the others %v, want %v", told, want)
	}
}

func waitKick(t *testing.T, kicked <-chan string) string {
	t.Helper()
	select {
	case id := <-kicked:
		return id
	case <-time.After(2 * time.Second):
		t.Fatal("the session was not ended")
		return ""
	}
}

// TestCacheTTLAndReload: without any signal, a cached credential is read
// again once it is older than the TTL, and ReloadCache replaces the whole
// cache (what a replica does after its listener was down).
func TestCacheTTLAndReload(t *testing.T) {
	ctx := context.Background()
	a, b := twoReplicas(t)
	now := time.Now()
	b.now = func() time.Time { return now }
	b.SetCacheTTL(time.Minute)
	_, old, _ := a.Register(ctx, NewDevice{ID: "gw-1"})
	_, other, _ := a.Register(ctx, NewDevice{ID: "gw-2"})
	authResult(t, b, "gw-1", old)
	authResult(t, b, "gw-2", other)
	if _, err := a.RotateToken(ctx, "gw-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RotateToken(ctx, "gw-2"); err != nil {
		t.Fatal(err)
	}
	now = now.Add(59 * time.Second)
	if got := authResult(t, b, "gw-1", old); got != AuthOK {
		t.Fatalf("within the TTL: %v", got)
	}
	now = now.Add(2 * time.Second)
	if got := authResult(t, b, "gw-1", old); got != AuthBadToken {
		t.Fatalf("past the TTL: %v, want the database's answer", got)
	}
	if n, err := b.ReloadCache(ctx); err != nil || n != 2 {
		t.Fatalf("reload: %d, %v", n, err)
	}
	if got := authResult(t, b, "gw-2", other); got != AuthBadToken {
		t.Fatalf("after a reload: %v, want the rotation seen", got)
	}
}

// TestAnalysisRunsOnOneReplica: while one replica holds the analysis lock,
// another's round does not analyse but reads the verdicts the first stored.
func TestAnalysisRunsOnOneReplica(t *testing.T) {
	ctx := context.Background()
	a, b := twoReplicas(t)
	if err := a.DecideVerdict(ctx, "gw-100", "1.0.3", "confirmed"); err != nil {
		t.Fatal(err)
	}
	release, ok, err := a.store.tryAdvisoryLock(ctx, analysisLock)
	if err != nil || !ok {
		t.Fatalf("lock: %v %v", ok, err)
	}
	if _, ok, _ := b.store.tryAdvisoryLock(ctx, analysisLock); ok {
		t.Fatal("two replicas hold the analysis lock")
	}
	if err := b.analyzeRound(ctx); err != nil {
		t.Fatal(err)
	}
	if got := b.JudgeFirmware("gw-100", "1.0.3"); len(got) != 1 {
		t.Fatalf("the follower's view of the confirmed verdict: %+v", got)
	}
	release()
	again, ok, err := b.store.tryAdvisoryLock(ctx, analysisLock)
	if err != nil || !ok {
		t.Fatalf("after release, the other replica cannot take the lock: %v %v", ok, err)
	}
	again()
}

// TestPrefetchAfterSignals: credentials another replica changed are loaded
// in batches as the signals arrive, so the devices' first connects here
// need no lookup of their own.
func TestPrefetchAfterSignals(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, b := twoReplicas(t)
	go b.RunPrefetch(ctx)
	const n = 300
	for i := range n {
		id := fmt.Sprintf("gw-%03d", i)
		if _, _, err := a.Register(ctx, NewDevice{ID: id}); err != nil {
			t.Fatal(err)
		}
		b.CredentialChanged(id, CredentialUpdated)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		b.mu.RLock()
		cached := len(b.cache)
		b.mu.RUnlock()
		if cached == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d changed credentials loaded", cached, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
