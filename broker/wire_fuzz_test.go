package broker

import (
	"bytes"
	"testing"
)

// wireScan is what the sniffer learnt from a byte stream.
type wireScan struct {
	pings     int32
	badHeader uint32
	state     uint8
	remaining int
}

func scanned(w *wireConn) wireScan {
	s := wireScan{pings: w.pings.Load(), badHeader: w.badHeader.Load(), state: w.state}
	if w.state == stBody {
		s.remaining = w.remaining // meaningful only in a body
	}
	return s
}

// frameStream is a reference for the sniffer: it walks a whole stream packet
// by packet as the spec frames it ([MQTT-2.1], [MQTT-1.5.5]), with the
// remaining length decoded in one go rather than byte by byte.
func frameStream(p []byte) wireScan {
	var s wireScan
	for len(p) > 0 {
		h := p[0]
		p = p[1:]
		if h>>4 == 12 {
			s.pings++
		}
		if !validHeader(h) && s.badHeader == 0 {
			s.badHeader = 0x100 | uint32(h)
		}
		n, used := 0, 0
		for used < len(p) && used < 4 {
			n |= int(p[used]&0x7f) << (7 * used)
			used++
			if p[used-1]&0x80 == 0 {
				break
			}
		}
		switch {
		case used == 4 && p[3]&0x80 != 0:
			s.state = stLost
			return s
		case used == 0 || p[used-1]&0x80 != 0:
			s.state = stLength // the length continues past the end
			return s
		}
		p = p[used:]
		if n > len(p) {
			s.state, s.remaining = stBody, n-len(p)
			return s
		}
		p = p[n:]
	}
	s.state = stHeader
	return s
}

// chunks splits p into pieces whose sizes cycle through sizes (each 1 to
// 256); no sizes means byte by byte.
func chunks(p, sizes []byte) [][]byte {
	var out [][]byte
	for i := 0; len(p) > 0; i++ {
		n := 1
		if len(sizes) > 0 {
			n = int(sizes[i%len(sizes)]) + 1
		}
		n = min(n, len(p))
		out = append(out, p[:n])
		p = p[n:]
	}
	return out
}

func FuzzWireScan(f *testing.F) {
	ping := []byte{0xc0, 0x00}
	connect := connectSpec{version: 4, id: "dev-0001", keepalive: 60}.encode()
	connect5 := connectSpec{version: 5, id: "dev-0001", user: "u", pass: "p", props: connectProps,
		willProp: willProps, willTopic: "devices/dev-0001/presence", willPayload: []byte("{}")}.encode()
	publish := publishPacket("devices/dev-0001/ota/status", bytes.Repeat([]byte("x"), 300), false, 4) // two length bytes
	subscribe := packet(0x82, append(appendString([]byte{0, 1}, "devices/dev-0001/ota/jobs"), 1))
	cat := func(ps ...[]byte) []byte { return bytes.Join(ps, nil) }
	for _, s := range [][]byte{
		{},
		ping,
		cat(connect, ping, ping, ping),
		cat(connect5, publish, ping, subscribe, ping),
		cat(connect, []byte{0xc2, 0x00}, ping),    // PINGREQ with reserved flags, then a good one
		cat(connect, []byte{0x80, 0x00}, ping),    // SUBSCRIBE without its 0x02 flags
		cat(connect, []byte{0x00, 0x00}, ping),    // reserved type 0
		cat(connect, []byte{0xe0, 0x00}),          // DISCONNECT
		{0x30, 0x80, 0x80, 0x80, 0x80, 0x01},      // five length bytes: lost
		{0x30, 0xff, 0xff, 0xff, 0x7f, 0xc0},      // the largest length, a "PINGREQ" inside the body
		{0x30, 0x80, 0x80, 0x00, 0xc0, 0x00},      // zero length in three bytes, then a PINGREQ
		{0x30, 0x80},                              // length continues past the end
		cat(connect[:len(connect)/2]),             // truncated
		cat(publish[:len(publish)-1], ping, ping), // truncated body swallows the pings
		bytes.Repeat(ping, 100),
	} {
		f.Add([]byte{}, s)
		f.Add([]byte{0, 2, 6}, s) // chunks of 1, 3 and 7 bytes
		f.Add([]byte{1, 255}, s)  // 2 and 256
		f.Add([]byte{4, 0, 0}, s) // 5, 1, 1
		f.Add([]byte{63, 128}, s) // 64, 129
		f.Add([]byte{2, 1, 0}, s) // 3, 2, 1
		f.Add([]byte{0x0f}, s)    // 16
		f.Add([]byte{255, 0}, s)  // 256, 1
	}

	f.Fuzz(func(t *testing.T, sizes, stream []byte) {
		whole := &wireConn{}
		whole.scan(stream)
		want := scanned(whole)

		split := &wireConn{}
		for _, c := range chunks(stream, sizes) {
			split.scan(c)
		}
		if got := scanned(split); got != want {
			t.Fatalf("scan of %x in chunks %v learnt %+v, in one piece %+v", stream, sizes, got, want)
		}
		if ref := frameStream(stream); ref != want {
			t.Fatalf("scan of %x learnt %+v, the packet framing says %+v", stream, want, ref)
		}
	})
}
