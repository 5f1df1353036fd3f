package fleet

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/fleetd/fleetd/internal/pgtest"
)

// Benchmarks of connection-event ingest, run by bench/run.sh event-ingest:
// fleetd's batched writer (COPY into a temp table, INSERT … ON CONFLICT,
// presence updates), a raw COPY into the same table (the peer), and one
// INSERT per row (for contrast).

const ingestBatch = 5000

func ingestEvents(n int, at time.Time) []Event {
	out := make([]Event, n)
	for i := range out {
		t := at.Add(time.Duration(i) * time.Microsecond)
		kind := KindConnect
		if i%2 == 1 {
			kind = KindDisconnect
		}
		out[i] = Event{ID: NewEventID(t), DeviceID: fmt.Sprintf("bench-%d", i%1000), At: t, Kind: kind, Reason: ReasonClientDisconnect,
			SessionEpoch: int64(i / 2), ProtocolVersion: 4, KeepaliveRequested: 30, KeepaliveEffective: 30, RemoteAddr: "127.0.0.1:5000",
			Listener: "tcp", BrokerNode: "bench", Firmware: "1.2.0", Model: "gw-100"}
	}
	return out
}

func reportRows(b *testing.B, rows int) {
	b.ReportMetric(float64(rows)/b.Elapsed().Seconds(), "rows/s")
}

func BenchmarkIngestWriter(b *testing.B) {
	pool := pgtest.New(b)
	store := NewStore(pool)
	ctx := context.Background()
	for i := range 1000 {
		store.insertDevice(ctx, NewDevice{ID: fmt.Sprintf("bench-%d", i)}, make([]byte, 32))
	}
	b.ResetTimer()
	rows := 0
	for b.Loop() {
		if err := store.writeEvents(ctx, ingestEvents(ingestBatch, time.Now())); err != nil {
			b.Fatal(err)
		}
		rows += ingestBatch
	}
	reportRows(b, rows)
}

func BenchmarkIngestCopy(b *testing.B) {
	pool := pgtest.New(b)
	ctx := context.Background()
	b.ResetTimer()
	rows := 0
	for b.Loop() {
		events := ingestEvents(ingestBatch, time.Now())
		_, err := pool.CopyFrom(ctx, pgx.Identifier{"device_events"}, eventColumns, pgx.CopyFromSlice(len(events), func(i int) ([]any, error) {
			return eventRow(&events[i]), nil
		}))
		if err != nil {
			b.Fatal(err)
		}
		rows += ingestBatch
	}
	reportRows(b, rows)
}

func BenchmarkIngestInsertPerRow(b *testing.B) {
	pool := pgtest.New(b)
	ctx := context.Background()
	b.ResetTimer()
	rows := 0
	for b.Loop() {
		for _, e := range ingestEvents(200, time.Now()) {
			if _, err := pool.Exec(ctx, `INSERT INTO device_events (id, device_id, at, kind, reason, session_epoch) VALUES ($1, $2, $3, $4, $5, $6)`,
				[16]byte(e.ID), e.DeviceID, e.At, string(e.Kind), string(e.Reason), e.SessionEpoch); err != nil {
				b.Fatal(err)
			}
			rows++
		}
	}
	reportRows(b, rows)
}
