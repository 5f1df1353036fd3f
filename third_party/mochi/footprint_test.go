// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: 2026 fleetd
// SPDX-FileContributor: fleetd

package mqtt

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/mochi-mqtt/server/v2/system"
	"github.com/stretchr/testify/require"
)

// idleFootprint is what one idle client costs the broker, measured from the
// runtime after garbage collections have shrunk every stack they can.
type idleFootprint struct {
	stack, heap, goroutines float64
}

// measureIdleClients connects n clients that do what a device does (CONNECT
// with a will, SUBSCRIBE, a retained birth message), leaves them idle, and
// returns the broker's stack and heap per client. The clients are plain
// sockets read synchronously, so they add no goroutine and little heap.
func measureIdleClients(t *testing.T, s *Server, n int) idleFootprint {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _ = s.EstablishConnection("t1", c) }()
		}
	}()

	settle := func() runtime.MemStats {
		var m runtime.MemStats
		for i := 0; i < 6; i++ { // each collection halves a stack at most once
			runtime.GC()
		}
		runtime.ReadMemStats(&m)
		return m
	}
	before := settle()
	g0 := runtime.NumGoroutine()

	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		conns = append(conns, c)
		id := fmt.Sprintf("idle-%d", i)
		r := bufio.NewReader(c)
		send := func(pk packets.Packet, encode func(*bytes.Buffer) error) {
			var b bytes.Buffer
			require.NoError(t, encode(&b))
			_, err := c.Write(b.Bytes())
			require.NoError(t, err)
		}
		expect := func(typ byte) {
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			h, err := r.ReadByte()
			require.NoError(t, err)
			require.Equal(t, typ, h>>4)
			l, err := r.ReadByte()
			require.NoError(t, err)
			_, err = r.Discard(int(l))
			require.NoError(t, err)
		}
		connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 300, ClientIdentifier: id,
				WillFlag: true, WillTopic: "devices/" + id + "/status", WillPayload: []byte(`{"online":false}`), WillRetain: true, WillQos: 1}}
		send(connect, connect.ConnectEncode)
		expect(packets.Connack)
		sub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4, PacketID: 1,
			Filters: packets.Subscriptions{{Filter: "devices/" + id + "/ota/job", Qos: 1}}}
		send(sub, sub.SubscribeEncode)
		expect(packets.Suback)
		birth := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, ProtocolVersion: 4,
			TopicName: "devices/" + id + "/status", Payload: []byte(`{"online":true,"firmware":"1.2.0"}`)}
		send(birth, birth.PublishEncode)
	}
	require.Eventually(t, func() bool { return s.Clients.Len() >= n }, 5*time.Second, 10*time.Millisecond, "clients %d", s.Clients.Len())
	time.Sleep(50 * time.Millisecond) // the births are handled
	after := settle()
	// FOOTPRINT_HEAP_PROFILE=file writes where the idle clients' heap is
	// (go tool pprof -sample_index=inuse_space; set runtime.MemProfileRate = 1
	// first for every allocation).
	if p := os.Getenv("FOOTPRINT_HEAP_PROFILE"); p != "" {
		f, _ := os.Create(p)
		_ = pprof.Lookup("heap").WriteTo(f, 0)
		f.Close()
	}
	g1 := runtime.NumGoroutine()
	return idleFootprint{
		stack:      float64(after.StackInuse-before.StackInuse) / float64(n),
		heap:       (float64(after.HeapInuse) - float64(before.HeapInuse)) / float64(n),
		goroutines: float64(g1-g0) / float64(n),
	}
}

// TestIdleClientFootprint keeps an idle client's goroutines small: Go halves
// a goroutine's stack at a collection only while less than a quarter of it
// is in use, so a read loop parked with a few hundred bytes more on its stack
// keeps twice the memory for every client, forever. An idle client must
// hold one goroutine (its read loop; the writer exists only while there is
// something to send) on an 8 KiB stack.
func TestIdleClientFootprint(t *testing.T) {
	caps := NewDefaultServerCapabilities()
	caps.MaximumClientWritesPending = 64 // the default, 8192, is a 64 KiB queue per client
	s := New(&Options{Logger: logger, Capabilities: caps, ClientNetReadBufferSize: 1024, ClientNetWriteBufferSize: 1024})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	defer s.Close()
	f := measureIdleClients(t, s, 300)
	t.Logf("per idle client: %.0f B of stack, %.0f B of heap (client sockets included), %.2f goroutines", f.stack, f.heap, f.goroutines)
	require.LessOrEqual(t, f.goroutines, 1.05, "goroutines per idle client")
	require.LessOrEqual(t, f.stack, 8.5*1024, "stack bytes per idle client")
}

// TestWriterOnDemand queues from many goroutines while writers start and
// stop: every queued message is written once, and no writer is left running.
func TestWriterOnDemand(t *testing.T) {
	cl, r, _ := newTestClient()
	defer cl.Stop(errClientStop)
	cl.Properties.ProtocolVersion = 4

	const senders, each = 8, 300
	read := make(chan int)
	go func() {
		n := 0
		br := bufio.NewReader(r)
		for n < senders*each {
			if _, err := br.ReadByte(); err != nil {
				break
			}
			l, _, err := packets.DecodeLength(br)
			if err != nil {
				break
			}
			if _, err := br.Discard(l); err != nil {
				break
			}
			n++
		}
		read <- n
	}()
	var wg sync.WaitGroup
	for g := 0; g < senders; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				pk := &packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte("x")}
				for !cl.queueOutbound(pk) {
					runtime.Gosched() // the queue holds 3: wait for the writer
				}
				if i%50 == 0 {
					time.Sleep(time.Millisecond) // let the writer drain and exit
				}
			}
		}()
	}
	wg.Wait()
	select {
	case n := <-read:
		require.Equal(t, senders*each, n)
	case <-time.After(10 * time.Second):
		t.Fatalf("not every queued message was written (%d queued)", atomic.LoadInt32(&cl.State.outboundQty))
	}
	require.Eventually(t, func() bool { return !cl.State.writing.Load() }, time.Second, time.Millisecond)
	require.Zero(t, atomic.LoadInt32(&cl.State.outboundQty))
}

// waitWritten waits until cl's writer has written every queued packet, for
// tests that close the connection after queueing: the writer is started by
// the first packet queued, so it may not have run yet.
func waitWritten(cl *Client) {
	deadline := time.Now().Add(5 * time.Second)
	for (atomic.LoadInt32(&cl.State.outboundQty) > 0 || cl.State.writing.Load()) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Microsecond)
	}
}

// TestRetainedExpiryCopiesNothing: the once-a-second sweep for expired
// retained messages reads them in place; it copied the whole retained map,
// a packets.Packet of several hundred bytes per retained message, each time.
func TestRetainedExpiryCopiesNothing(t *testing.T) {
	s := New(&Options{Logger: logger})
	defer s.Close()
	for i := 0; i < 1000; i++ {
		topic := fmt.Sprintf("devices/d%d/status", i)
		s.Topics.RetainMessage(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
			TopicName: topic, Payload: []byte("{}"), Created: time.Now().Unix()})
	}
	require.Equal(t, 1000, s.Topics.Retained.Len())
	allocs := testing.AllocsPerRun(10, func() { s.clearExpiredRetainedMessages(time.Now().Unix()) })
	require.LessOrEqual(t, allocs, 2.0)
	require.Equal(t, 1000, s.Topics.Retained.Len())

	// Expired ones still go: a v5 message past its expiry.
	s.Topics.RetainMessage(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
		TopicName: "devices/old/status", Payload: []byte("{}"), ProtocolVersion: 5, Expiry: time.Now().Unix() - 10})
	s.clearExpiredRetainedMessages(time.Now().Unix())
	_, ok := s.Topics.Retained.Get("devices/old/status")
	require.False(t, ok)
	require.Equal(t, 1000, s.Topics.Retained.Len())
}

type smallReadConn struct{ net.Conn }

func (smallReadConn) ReadBufferSize() int { return 64 }

// TestReadBufferSizer lets a connection that buffers its own reads choose a
// small read buffer.
func TestReadBufferSizer(t *testing.T) {
	o := &ops{info: new(system.Info), hooks: new(Hooks), log: logger,
		options: &Options{Capabilities: NewDefaultServerCapabilities(), ClientNetReadBufferSize: 1024}}
	r, w := net.Pipe()
	defer r.Close()
	defer w.Close()
	require.Equal(t, 1024, newClient(w, o).Net.bconn.Size())
	require.Equal(t, 64, newClient(smallReadConn{w}, o).Net.bconn.Size())
}
