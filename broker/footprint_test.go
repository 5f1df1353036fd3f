package broker

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

// settledMemStats collects until every stack that can shrink has: a
// collection halves a goroutine's stack at most once.
func settledMemStats() runtime.MemStats {
	var m runtime.MemStats
	for range 6 {
		runtime.GC()
	}
	runtime.ReadMemStats(&m)
	return m
}

// TestIdleDeviceStack keeps an idle device's connection small: one
// goroutine (mochi's read loop, patched in third_party/mochi so that a
// client's writer exists only while it has something to send) parked on a
// 4 KiB stack. Go halves a stack at a collection only while less than a
// quarter of it is in use (counting an 800-byte guard), so a few hundred
// bytes more in the frames below the parked read (fleetd's listener, wire
// sniffer, mochi's client loop) double the stack of every device. The devices do what fleetsim's do: CONNECT with a
// will, a retained birth, SUBSCRIBE to their commands and jobs.
func TestIdleDeviceStack(t *testing.T) {
	const n = 200
	e := newEnv(t)
	tokens := make([]string, n)
	for i := range tokens {
		tokens[i] = e.register(fmt.Sprintf("idle-%d", i))
	}
	before := settledMemStats()
	g0 := runtime.NumGoroutine()
	for i := range n {
		id := fmt.Sprintf("idle-%d", i)
		c := dialRaw(t, e.addr("tcp"))
		if code := c.connectWith(connectSpec{version: 4, id: id, user: id, pass: tokens[i], keepalive: 300,
			willTopic: "devices/" + id + "/status", willPayload: []byte(`{"online":false}`), willQoS: 1, willRetain: true}); code != 0 {
			t.Fatalf("%s: CONNACK %d", id, code)
		}
		c.send(packet(0x31, append(appendString(nil, "devices/"+id+"/status"), birthPayload("1.2.0")...)))
		sub := binary.BigEndian.AppendUint16(nil, 1)
		sub = append(appendString(sub, "devices/"+id+"/cmd/#"), 1)
		sub = append(appendString(sub, "devices/"+id+"/ota/job"), 1)
		c.send(packet(0x82, sub))
		if typ, _ := c.read(); typ>>4 != 9 {
			t.Fatalf("%s: expected SUBACK, got 0x%02x", id, typ)
		}
	}
	e.waitDevice(fmt.Sprintf("idle-%d", n-1), 5*time.Second, func(d fleet.Device) bool { return d.Firmware == "1.2.0" })
	after := settledMemStats()
	stack := float64(after.StackInuse-before.StackInuse) / n
	goroutines := float64(runtime.NumGoroutine()-g0) / n
	t.Logf("per idle device: %.0f B of stack, %.0f B of heap (the test's sockets included), %.2f goroutines",
		stack, (float64(after.HeapInuse)-float64(before.HeapInuse))/n, goroutines)
	if goroutines > 1.05 {
		t.Errorf("%.2f goroutines per idle device, want 1 (mochi's read loop)", goroutines)
	}
	// A few hundred bytes over the limit are the test's own goroutines.
	if stack > idleStackLimit+512 {
		t.Errorf("%.0f B of stack per idle device, want %d: the frames below a parked read (fleetd's listener, wire sniffer, mochi's client loop) hold more than lets Go shrink the stack",
			stack, idleStackLimit)
	}
}
