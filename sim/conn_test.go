package sim

import (
	"bytes"
	"net"
	"sync"
	"testing"

	"github.com/eclipse/paho.golang/packets"
)

// recorder is the socket under a firmwareConn: it keeps what was sent.
type recorder struct {
	net.Conn
	sent bytes.Buffer
}

func (r *recorder) Write(p []byte) (int, error) { return r.sent.Write(p) }

func TestFirmwareConnPings(t *testing.T) {
	publish := []byte{0x30, 0x05, 0x00, 0x01, 'a', 0xC0, 0x00} // a PUBLISH whose payload holds the bytes of a PINGREQ
	pingreq := []byte{0xC0, 0x00}
	long := append([]byte{0x30, 0x82, 0x01}, make([]byte, 130)...) // two-byte remaining length
	stream := append(append(append(append([]byte{}, publish...), pingreq...), long...), pingreq...)
	tests := []struct {
		pings string
		want  []byte
	}{
		{"normal", stream},
		{"malformed", append(append(append(append([]byte{}, publish...), 0xC2, 0x00), long...), 0xC2, 0x00)},
		{"none", append(append([]byte{}, publish...), long...)},
	}
	for _, tt := range tests {
		for split := 1; split < len(stream); split++ {
			rec := &recorder{}
			fc := newFirmwareConn(rec, tt.pings)
			for _, part := range [][]byte{stream[:split], stream[split:]} {
				if n, err := fc.Write(part); err != nil || n != len(part) {
					t.Fatalf("%s split %d: Write = %d, %v", tt.pings, split, n, err)
				}
			}
			if !bytes.Equal(rec.sent.Bytes(), tt.want) {
				t.Fatalf("%s split %d:\n got %x\nwant %x", tt.pings, split, rec.sent.Bytes(), tt.want)
			}
		}
	}
}

func TestFirmwareConnFreeze(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	fc := newFirmwareConn(a, "normal")
	fc.freeze()
	if n, err := fc.Write([]byte{0xC0, 0x00}); n != 2 || err != nil {
		t.Fatalf("frozen Write = %d, %v; want a silent success", n, err)
	}
	if err := fc.Close(); err != nil {
		t.Fatal(err)
	}
	// The library's Close left the socket open: the peer can still write to it.
	go b.Write([]byte("x"))
	buf := make([]byte, 1)
	if _, err := a.Read(buf); err != nil {
		t.Fatalf("socket closed by the library's Close while frozen: %v", err)
	}
	fc.closeSocket()
	if _, err := b.Write([]byte("y")); err == nil {
		t.Fatal("socket still open after closeSocket")
	}
}

// TestFirmwareConnWholePackets: paho.golang writes a packet in several Write
// calls from several goroutines (its pinger sends the first PINGREQ while
// the birth message is going out); a PINGREQ must never land inside another
// packet.
func TestFirmwareConnWholePackets(t *testing.T) {
	rec := &recorder{}
	fc := newFirmwareConn(rec, "normal")
	const n = 200
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(2)
		go func() {
			defer wg.Done()
			pb := &packets.Publish{Topic: "devices/d/telemetry", QoS: 1, PacketID: uint16(i + 1), Payload: []byte(`{"rssi_dbm":-50}`),
				Properties: &packets.Properties{}}
			if _, err := pb.WriteTo(fc); err != nil {
				t.Error(err)
			}
		}()
		go func() {
			defer wg.Done()
			if _, err := packets.NewControlPacket(packets.PINGREQ).WriteTo(fc); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	r := bytes.NewReader(rec.sent.Bytes())
	got := map[byte]int{}
	for r.Len() > 0 {
		cp, err := packets.ReadPacket(r)
		if err != nil {
			t.Fatalf("stream broken after %v: %v", got, err)
		}
		got[cp.Type]++
	}
	if got[packets.PUBLISH] != n || got[packets.PINGREQ] != n || len(got) != 2 {
		t.Fatalf("packets by type %v, want %d PUBLISH and %d PINGREQ", got, n, n)
	}
}
