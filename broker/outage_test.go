package broker

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/pgserver"
	"github.com/fleetd/fleetd/migrations"
)

// TestDatabaseOutage stops PostgreSQL for 20 s while 100 devices connect,
// announce themselves and disconnect. Credentials come from memory, events go
// to the spool, and once the database is back every event is stored exactly
// once and every device's presence is right.
func TestDatabaseOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("20 s outage")
	}
	bin, err := pgserver.FindBinDir(os.Getenv("FLEETD_PG_BIN"))
	if err != nil {
		t.Skip(err)
	}
	dir, _ := os.MkdirTemp("", "broker-outage-")
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	pg := &pgserver.Server{Dir: filepath.Join(dir, "pg"), BinDir: bin, DieWithParent: true, Settings: map[string]string{"fsync": "off"}}
	ctx := context.Background()
	if err := pg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, pg.ConnString())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if _, err := migrations.Up(ctx, pool, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	e := newEnvWithPool(t, pool, dir)

	const devices = 100
	tokens := map[string]string{}
	for i := range devices {
		id := fmt.Sprintf("o%03d", i)
		tokens[id] = e.register(id)
	}

	if err := pg.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	outage := time.Now()
	// Two waves of sessions during the outage: every device connects,
	// announces its firmware and disconnects, twice.
	for wave := range 2 {
		var wg sync.WaitGroup
		for id, tok := range tokens {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := dialRaw(t, e.addr("tcp"))
				if code := c.connect(4, id, id, tok, 30); code != 0 {
					t.Errorf("%s wave %d: CONNACK 0x%02x during the outage", id, wave, code)
					return
				}
				c.send(publishPacket("devices/"+id+"/status", birthPayload(fmt.Sprintf("1.%d.0", wave)), true, 4))
				c.send([]byte{0xE0, 0x00})
				c.closedWithin(2 * time.Second)
			}()
		}
		wg.Wait()
		time.Sleep(5 * time.Second)
	}
	if t.Failed() {
		t.FailNow()
	}
	if st, err := os.Stat(filepath.Join(dir, "spool", "events.jsonl")); err != nil || st.Size() == 0 {
		t.Fatalf("events were not spooled during the outage: %v", err)
	}
	time.Sleep(20*time.Second - time.Since(outage))

	pg2 := &pgserver.Server{Dir: pg.Dir, BinDir: bin, DieWithParent: true}
	if err := pg2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg2.Stop(context.Background()) })

	want := devices * 2 * 3 // connect, birth, disconnect per session
	deadline := time.Now().Add(30 * time.Second)
	var total, distinct int
	for time.Now().Before(deadline) {
		if err := pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT id) FROM device_events`).Scan(&total, &distinct); err == nil && total >= want {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Give a wrongly repeated replay the chance to show up before counting.
	time.Sleep(500 * time.Millisecond)
	pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT id) FROM device_events`).Scan(&total, &distinct)
	if total != want || distinct != want {
		t.Fatalf("stored %d events (%d distinct), want %d exactly once", total, distinct, want)
	}
	var wrong int
	pool.QueryRow(ctx, `SELECT count(*) FROM devices WHERE online OR firmware <> '1.1.0' OR last_disconnect <> 'client_disconnect'`).Scan(&wrong)
	if wrong != 0 {
		t.Fatalf("%d devices with wrong presence after the replay", wrong)
	}
	var perDevice int
	pool.QueryRow(ctx, `SELECT count(*) FROM (SELECT device_id FROM device_events WHERE kind = 'disconnect' GROUP BY device_id HAVING count(*) <> 2) x`).Scan(&perDevice)
	if perDevice != 0 {
		t.Fatalf("%d devices without exactly two disconnect events", perDevice)
	}
}
