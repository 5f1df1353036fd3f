package broker

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	rtmetrics "runtime/metrics"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// connectProps are the CONNECT properties a fleet device typically sends:
// session expiry, receive maximum, maximum packet size, a user property and
// an authentication method ([MQTT-3.1.2.11]).
var connectProps = func() []byte {
	p := []byte{0x11, 0, 0, 0x0e, 0x10, 0x21, 0, 10, 0x27, 0, 0, 0x40, 0}
	p = appendString(append(p, 0x26), "fw")
	p = appendString(p, "2.4.1")
	return appendString(append(p, 0x15), "token")
}()

// willProps: will delay interval, payload format, message expiry, content type.
var willProps = appendString([]byte{0x18, 0, 0, 0, 5, 0x01, 1, 0x02, 0, 0, 0x0e, 0x10, 0x03}, "application/json")

// connectSeeds are valid CONNECTs of every protocol version, with and without
// will, user name, password and properties.
func connectSeeds() [][]byte {
	will := connectSpec{willTopic: "devices/d1/presence", willPayload: []byte(`{"online":false}`), willQoS: 1, willRetain: true}
	var seeds [][]byte
	for _, v := range []byte{3, 4, 5} {
		base := connectSpec{version: v, id: "dev-0001", keepalive: 60}
		full := will
		full.version, full.id, full.user, full.pass, full.keepalive = v, "dev-0001", "dev-0001", "s3cret", 30
		if v == 5 {
			full.props, full.willProp = connectProps, willProps
		}
		empty := connectSpec{version: v} // empty client id, keepalive 0
		seeds = append(seeds, base.encode(), full.encode(), empty.encode())
	}
	return seeds
}

func FuzzReadConnect(f *testing.F) {
	const def = 256 << 10 // fleetd's default --mqtt-max-packet
	// The fuzzed bound is maxPacket-1 (maxPacket = 1 + bound mod def), so
	// that every value of it is a usable maxPacket.
	add := func(data []byte, maxPacket int) { f.Add(data, uint32(maxPacket-1)) }
	for _, s := range connectSeeds() {
		remaining, _, _ := specLength(s)
		add(s, def)
		add(s, remaining+1) // exactly the bound (remaining length plus the header byte): accepted
		add(s, remaining)   // one byte over the bound
		for _, cut := range []int{1, 2, len(s) / 2, len(s) - 1} {
			add(s[:cut], def) // truncated
		}
		add(append(s, 0xc0, 0x00), def) // a PINGREQ right behind
	}
	for _, s := range [][]byte{
		{},
		{0x10},
		{0x10, 0x00},                         // zero remaining length
		{0x10, 0x80},                         // length continues past the end
		{0x10, 0x80, 0x00},                   // zero length in two bytes
		{0x10, 0xff, 0xff, 0xff, 0x7f},       // 268435455, the largest length, nothing behind it
		{0x10, 0xff, 0xff, 0xff, 0xff, 0x7f}, // five length bytes
		{0x10, 0x80, 0x80, 0x80, 0x80, 0x01}, // five length bytes, 2^28
		{0x10, 0x80, 0x80, 0x80, 0x80, 0x00}, // five length bytes, zero
		{0x10, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00},
		{0x10, 0x8c, 0x80, 0x80, 0x80, 0x00, 0, 4, 'M', 'Q', 'T', 'T', 4, 2, 0, 60, 0, 0}, // a CONNECT behind five length bytes, which mochi's DecodeLength accepts
		{0x10, 0xfe, 0xff, 0x03, 0, 4, 'M', 'Q', 'T', 'T'},                                // 65534 declared, 6 sent
		{0x10, 0x0c, 0, 4, 'M', 'Q', 'T', 'T', 4, 0xc2, 0, 60, 0, 0},                      // user and password flags, no fields
		{0x10, 0x0d, 0, 4, 'M', 'Q', 'T', 'T', 5, 0x02, 0, 60, 0x05, 0x11, 0},             // properties longer than the packet
		{0x10, 0x0c, 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, 0, 2},                      // client id longer than the packet
		{0x10, 0x0e, 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, 0, 2, 0xc3, 0x28},          // client id not UTF-8
		{0x11, 0x0c, 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, 0, 0},                      // reserved flags set
		{0xc0, 0x00},                      // PINGREQ first
		{0x30, 0x05, 0, 1, 't', 'h', 'i'}, // PUBLISH first
		{0x10, 0x10, 0, 4, 'M', 'Q', 'T', 'T', 5, 0x02, 0, 60, 0xff, 0xff, 0xff, 0xff, 0x0f}, // properties length overflow
	} {
		add(s, def)
		add(s, 1024) // fleetd's smallest --mqtt-max-packet
	}

	f.Fuzz(func(t *testing.T, data []byte, bound uint32) {
		maxPacket := 1 + int(bound%def)
		before := heapAllocs()
		pk, err := readConnect(bytes.NewReader(data), maxPacket)
		allocated := heapAllocs() - before

		// Allocation is bounded by maxPacket, whatever length is declared.
		// The slack covers bufio, the decoded fields and the allocator
		// counting whole spans; a declared length read before the bound
		// check would exceed it by orders of magnitude.
		if limit := 2*uint64(maxPacket) + 4<<20; allocated > limit {
			t.Fatalf("readConnect(%x, %d) allocated %d bytes, bound %d", data, maxPacket, allocated, limit)
		}

		declared, n, ok := specLength(data)
		if ok && declared+1 > maxPacket && !errors.Is(err, packets.ErrPacketTooLarge) {
			t.Fatalf("readConnect(%x, %d): declared %d bytes over the bound, err %v, want ErrPacketTooLarge", data, maxPacket, declared, err)
		}
		if ok && declared+1 <= maxPacket && len(data) < 1+n+declared && err == nil {
			t.Fatalf("readConnect(%x, %d): %d body bytes declared, %d sent, no error", data, maxPacket, declared, len(data)-1-n)
		}
		if err != nil {
			return
		}
		if pk.FixedHeader.Type != packets.Connect {
			t.Fatalf("readConnect(%x, %d) succeeded with packet type %d", data, maxPacket, pk.FixedHeader.Type)
		}
		if pk.FixedHeader.Remaining+1 > maxPacket {
			t.Fatalf("readConnect(%x, %d) accepted remaining length %d", data, maxPacket, pk.FixedHeader.Remaining)
		}
		if ok && pk.FixedHeader.Remaining != declared {
			t.Fatalf("readConnect(%x, %d): remaining length %d, declared %d", data, maxPacket, pk.FixedHeader.Remaining, declared)
		}
	})
}

// specLength decodes the remaining length of the packet in b the way the spec
// defines it: at most four bytes ([MQTT-1.5.5], [MQTT-2.1.4]). It reports how
// many length bytes it used, and false when b holds no CONNECT fixed header
// and complete length.
func specLength(b []byte) (length, n int, ok bool) {
	if len(b) == 0 || b[0] != 0x10 {
		return 0, 0, false
	}
	for i, mult := 1, 1; i < len(b) && i <= 4; i, mult = i+1, mult*128 {
		length += int(b[i]&0x7f) * mult
		if b[i]&0x80 == 0 {
			return length, i, true
		}
	}
	return 0, 0, false
}

var allocSample = []rtmetrics.Sample{{Name: "/gc/heap/allocs:bytes"}}

// heapAllocs returns the bytes allocated on the heap so far. Unlike
// runtime.ReadMemStats it does not stop the world, so it can run on every
// fuzz input.
func heapAllocs() uint64 {
	rtmetrics.Read(allocSample)
	return allocSample[0].Value.Uint64()
}

// TestReadConnect pins the seeds' meaning: the valid CONNECTs decode, and the
// bound is checked before the body is read.
func TestReadConnect(t *testing.T) {
	type testCase struct {
		name      string
		data      []byte
		maxPacket int
		wantErr   error // nil: success
	}
	tests := []testCase{
		{"v3", connectSpec{version: 3, id: "d1", keepalive: 60}.encode(), 1024, nil},
		{"v5 with will, credentials and properties", connectSpec{version: 5, id: "d1", user: "u", pass: "p",
			props: connectProps, willProp: willProps, willTopic: "t", willPayload: []byte("x")}.encode(), 1024, nil},
		{"huge declared length", []byte{0x10, 0xff, 0xff, 0xff, 0x7f}, 1024, packets.ErrPacketTooLarge},
		{"five length bytes", []byte{0x10, 0x80, 0x80, 0x80, 0x80, 0x01}, 1024, packets.ErrMalformedVariableByteInteger},
		{"truncated body", []byte{0x10, 0x0c, 0, 4, 'M'}, 1024, io.ErrUnexpectedEOF},
		{"not a CONNECT", []byte{0xc0, 0x00}, 1024, errAny},
		{"reserved flags", []byte{0x11, 0x00}, 1024, packets.ErrMalformedFlags},
	}
	for i, s := range connectSeeds() {
		tests = append(tests, testCase{fmt.Sprintf("seed %d", i), s, 1024, nil})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pk, err := readConnect(bytes.NewReader(tt.data), tt.maxPacket)
			switch {
			case tt.wantErr == nil && err != nil:
				t.Fatalf("readConnect: %v", err)
			case tt.wantErr == nil && pk.FixedHeader.Type != packets.Connect:
				t.Fatalf("packet type %d, want CONNECT", pk.FixedHeader.Type)
			case tt.wantErr == errAny && err == nil, tt.wantErr != nil && tt.wantErr != errAny && !errors.Is(err, tt.wantErr):
				t.Fatalf("err %v, want %v", err, tt.wantErr)
			}
		})
	}
}

var errAny = errors.New("any error")
