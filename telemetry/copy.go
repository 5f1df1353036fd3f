package telemetry

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"sync"

	"github.com/jackc/pgx/v5"
)

// The batch write's COPY is encoded here, in PostgreSQL's binary COPY format,
// rather than by pgx.CopyFrom from rows of []any: pgx boxes every value of
// every row into an interface and looks up an encode plan per value and per
// array element, about fifteen allocations a message, while the row layout
// of telemetry_raw is fixed and small (rawColumns). Here a batch costs one
// buffer, reused.

// PostgreSQL's type OIDs of the array elements (pg_type).
const (
	oidText   = 25
	oidFloat8 = 701
)

// pgEpochMicros is 2000-01-01 00:00 UTC, PostgreSQL's timestamp epoch, in
// microseconds since the Unix epoch.
const pgEpochMicros = 946_684_800_000_000

// copyHeader starts a binary COPY: the signature, no flags, no extension.
var copyHeader = []byte("PGCOPY\n\377\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00")

// copyBuffers holds the encoded batches between writes (a batch of 5000
// messages is about 600 KB).
var copyBuffers = sync.Pool{New: func() any { return new([]byte) }}

// copyRaw copies the batch's rows into table (telemetry_raw, or the checked
// write's telemetry_in) in tx.
func copyRaw(ctx context.Context, tx pgx.Tx, table string, batch []Entry) error {
	buf := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(buf)
	*buf = encodeRows((*buf)[:0], batch)
	sql := "COPY " + pgx.Identifier{table}.Sanitize() + " (" + rawColumns + ") FROM STDIN (FORMAT binary)"
	if _, err := tx.Conn().PgConn().CopyFrom(ctx, bytes.NewReader(*buf), sql); err != nil {
		return fmt.Errorf("copy telemetry: %w", err)
	}
	return nil
}

// encodeRows appends the binary COPY of the batch's rows (rawColumns) to b.
func encodeRows(b []byte, batch []Entry) []byte {
	b = append(b, copyHeader...)
	for i := range batch {
		e := &batch[i]
		b = binary.BigEndian.AppendUint16(b, 8) // fields
		b = appendText(b, e.DeviceID)
		b = binary.BigEndian.AppendUint32(b, 8)
		b = binary.BigEndian.AppendUint64(b, uint64(e.At.Unix()*1_000_000+int64(e.At.Nanosecond())/1000-pgEpochMicros))
		b = appendArray(b, oidText, e.Metrics, func(b []byte, m Metric) []byte { return appendText(b, m.Name) })
		b = appendArray(b, oidFloat8, e.Metrics, func(b []byte, m Metric) []byte {
			return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(b, 8), math.Float64bits(m.Value))
		})
		b = appendNullText(b, e.Link.BSSID)
		b = appendNullText(b, e.Link.SSID)
		b = appendNullText(b, e.Link.Band)
		if e.Link.Channel == 0 {
			b = binary.BigEndian.AppendUint32(b, math.MaxUint32) // NULL
		} else {
			b = binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint32(b, 2), uint16(int16(e.Link.Channel)))
		}
	}
	return binary.BigEndian.AppendUint16(b, math.MaxUint16) // end of data (-1)
}

// appendText appends a text field: its length and its bytes.
func appendText(b []byte, s string) []byte {
	return append(binary.BigEndian.AppendUint32(b, uint32(len(s))), s...)
}

// appendNullText appends s, or NULL when it is empty (a link field not
// reported).
func appendNullText(b []byte, s string) []byte {
	if s == "" {
		return binary.BigEndian.AppendUint32(b, math.MaxUint32)
	}
	return appendText(b, s)
}

// appendArray appends a one-dimensional array field of the metrics' names
// or values (element type oid), with no NULL elements; an empty array has
// no dimension, as PostgreSQL writes it.
func appendArray(b []byte, oid uint32, ms []Metric, elem func([]byte, Metric) []byte) []byte {
	at := len(b)
	b = append(b, 0, 0, 0, 0) // length, set below
	dims := uint32(0)
	if len(ms) > 0 {
		dims = 1
	}
	b = binary.BigEndian.AppendUint32(b, dims)
	b = binary.BigEndian.AppendUint32(b, 0) // no NULLs
	b = binary.BigEndian.AppendUint32(b, oid)
	if dims == 1 {
		b = binary.BigEndian.AppendUint32(b, uint32(len(ms)))
		b = binary.BigEndian.AppendUint32(b, 1) // lower bound
	}
	for _, m := range ms {
		b = elem(b, m)
	}
	binary.BigEndian.PutUint32(b[at:], uint32(len(b)-at-4))
	return b
}
