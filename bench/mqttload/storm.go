package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/web/client"
)

// stormResult is what the storm mode measured, in Unix milliseconds where it
// gives instants, so that the caller can set them against when it restarted
// the broker.
type stormResult struct {
	Mode      string `json:"mode"`
	Devices   int    `json:"devices"`
	Dropped   int    `json:"dropped"`
	Back      int    `json:"back"`
	FirstDrop int64  `json:"first_drop_unix_ms"`
	// FirstBack and AllBack are when the first and the last device had
	// their CONNACK again.
	FirstBack int64 `json:"first_back_unix_ms"`
	AllBack   int64 `json:"all_back_unix_ms"`
	// Attempts counts reconnect attempts; Refused the ones answered with a
	// refusing CONNACK (a broker's rate limit), DialErrors the ones that
	// found no listener or lost the socket.
	Attempts   int64 `json:"attempts"`
	Refused    int64 `json:"refused"`
	DialErrors int64 `json:"dial_errors"`
}

// storm holds n devices connected (keepalive 300 s, from several loopback
// source addresses), writes readyFile once they all are, and when the broker
// goes away has each one retry every ~retry (uniform jitter up to twice
// that) until it is back, or until timeout after the first drop. The
// sessions stay open after that, for the caller to inspect the broker. The
// devices retry promptly on purpose: then the time until all are back is set
// by the broker's admission, not by the devices' backoff.
func storm(addr string, ids []cred, sources []string, retry, timeout time.Duration, readyFile string) any {
	res := stormResult{Mode: "storm", Devices: len(ids)}
	var firstDrop, firstBack, allBack atomic.Int64
	var dropped, back atomic.Int64
	var attempts, refused, dialErrors atomic.Int64
	dialer := func(i int) *net.Dialer {
		d := &net.Dialer{Timeout: 5 * time.Second}
		if len(sources) > 0 {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(sources[i%len(sources)])}
		}
		return d
	}
	conns := make([]net.Conn, len(ids))
	inParallel(len(ids), 64, func(i int) error {
		for {
			conn, code, err := handshake(dialer(i), addr, ids[i])
			if err == nil && code == 0 {
				conns[i] = conn
				return nil
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	if err := os.WriteFile(readyFile, []byte("held\n"), 0o644); err != nil {
		fail(err)
	}
	done := make(chan struct{}, len(ids))
	for i, conn := range conns {
		go func() {
			io.Copy(io.Discard, conn) // returns when the broker goes away
			conn.Close()
			now := time.Now().UnixMilli()
			firstDrop.CompareAndSwap(0, now)
			dropped.Add(1)
			rnd := rand.New(rand.NewPCG(uint64(i), 7))
			for {
				time.Sleep(time.Duration(rnd.Int64N(int64(2 * retry))))
				attempts.Add(1)
				c, code, err := handshake(dialer(i), addr, ids[i])
				if err != nil {
					dialErrors.Add(1)
					continue
				}
				if code != 0 {
					refused.Add(1)
					c.Close()
					continue
				}
				now := time.Now().UnixMilli()
				firstBack.CompareAndSwap(0, now)
				allBack.Store(max(allBack.Load(), now))
				back.Add(1)
				done <- struct{}{}
				// Hold the session until the process ends.
				io.Copy(io.Discard, c)
				return
			}
		}()
	}
	var deadline <-chan time.Time
	for n := 0; n < len(ids); n++ {
		if deadline == nil {
			// The timeout runs from the first drop.
			<-done
			deadline = time.After(timeout)
			continue
		}
		select {
		case <-done:
		case <-deadline:
			n = len(ids)
		}
	}
	res.Dropped, res.Back = int(dropped.Load()), int(back.Load())
	res.FirstDrop, res.FirstBack, res.AllBack = firstDrop.Load(), firstBack.Load(), allBack.Load()
	res.Attempts, res.Refused, res.DialErrors = attempts.Load(), refused.Load(), dialErrors.Load()
	return res
}

// handshake dials and runs CONNECT; it returns the socket and the CONNACK's
// return code (0 accepted) or the dial/read error.
func handshake(d *net.Dialer, addr string, c cred) (net.Conn, byte, error) {
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, 0, err
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(connectPacket(c, 300, false)); err != nil {
		conn.Close()
		return nil, 0, err
	}
	var ack [4]byte
	if _, err := io.ReadFull(conn, ack[:]); err != nil {
		conn.Close()
		return nil, 0, err
	}
	if ack[0] != 0x20 {
		conn.Close()
		return nil, 0, fmt.Errorf("not a CONNACK: %x", ack)
	}
	conn.SetDeadline(time.Time{})
	return conn, ack[3], nil
}

// registerDevices registers prefix0..prefix(n-1) through fleetd's API, 16 at
// a time, and returns their credentials.
func registerDevices(api, token, prefix string, n int) ([]cred, error) {
	cl := client.New(api, token)
	out := make([]cred, n)
	err := inParallel(n, 16, func(i int) error {
		id := fmt.Sprintf("%s%d", prefix, i)
		r, err := cl.RegisterDevice(context.Background(), fleet.NewDevice{ID: id, Model: "gw-100"})
		if err != nil {
			return fmt.Errorf("register %s: %w", id, err)
		}
		out[i] = cred{id: id, password: r.Token}
		return nil
	})
	return out, err
}

// inParallel calls f for 0..n-1 from workers goroutines and returns the
// first error; a worker whose call fails stops taking more.
func inParallel(n, workers int, f func(i int) error) error {
	var next atomic.Int64
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				if err := f(i); err != nil {
					mu.Lock()
					first = cmp.Or(first, err)
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}
