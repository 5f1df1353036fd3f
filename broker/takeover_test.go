package broker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetd/fleetd/fleet"
)

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestTwinsNeverShareASession plays pairs of devices that share a client id
// and reconnect as soon as they are taken over (the clone ping-pong of the
// field). At every instant at most one session of an id is live, every
// ended session is recorded as session_takeover, and MQTT 3 twins are never
// sent a DISCONNECT (MQTT 3 defines none from the server).
func TestTwinsNeverShareASession(t *testing.T) {
	e := newEnv(t)
	const ids = 6
	tokens := map[string]string{}
	for i := range ids {
		id := fmt.Sprintf("twin-%d", i)
		tokens[id] = e.register(id)
	}
	stop := make(chan struct{})
	var connects, v3Disconnects atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	type held struct {
		id string
		c  *rawClient
	}
	var open []held // the twins' sockets at the end
	for i := range ids {
		id := fmt.Sprintf("twin-%d", i)
		v := byte(4)
		if i%2 == 1 {
			v = 5
		}
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					conn, err := net.DialTimeout("tcp", e.addr("tcp"), 5*time.Second)
					if err != nil {
						continue
					}
					c := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn), v: v}
					conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
					conn.Write(connectPacket(v, id, id, tokens[id], 30))
					typ, body, err := c.tryRead(5 * time.Second)
					if err != nil || typ>>4 != 2 || len(body) < 2 || body[1] != 0 {
						c.conn.Close()
						continue
					}
					connects.Add(1)
					for { // hold the session until the twin takes it over
						typ, _, err := c.tryRead(50 * time.Millisecond)
						if err == nil {
							if typ>>4 == 14 && v < 5 {
								v3Disconnects.Add(1)
							}
							continue
						}
						if isTimeout(err) {
							select {
							case <-stop:
								mu.Lock()
								open = append(open, held{id, c})
								mu.Unlock()
								return
							default:
								continue
							}
						}
						break // taken over: reconnect at once, with a little jitter
					}
					c.conn.Close()
					time.Sleep(time.Duration(rand.IntN(5)) * time.Millisecond)
				}
			}()
		}
	}
	// The invariant, sampled while the twins fight.
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		// sync.Map's Range is no snapshot: an old session seen live early
		// in it may be closed by the time its successor appears, so the
		// liveness of what it saw is checked once it is done. A real second
		// session stays live (nothing ends it), so it is still caught.
		var seen []*mqtt.Client
		ids := map[*mqtt.Client]string{}
		e.b.sessions.Range(func(k, v any) bool {
			seen = append(seen, k.(*mqtt.Client))
			ids[k.(*mqtt.Client)] = v.(*session).deviceID
			return true
		})
		live := map[string]int{}
		for _, cl := range seen {
			if !cl.Closed() {
				live[ids[cl]]++
			}
		}
		for id, n := range live {
			if n > 1 {
				var desc []string
				e.b.sessions.Range(func(k, v any) bool {
					cl, s := k.(*mqtt.Client), v.(*session)
					if s.deviceID == id {
						cur, _ := e.b.srv.Clients.Get(id)
						desc = append(desc, fmt.Sprintf("epoch=%d closed=%v takenOver=%v indexed=%v remote=%s", s.epoch, cl.Closed(), s.takenOver.Load(), cur == cl, cl.Net.Remote))
					}
					return true
				})
				t.Fatalf("%s has %d live sessions at once: %v", id, n, desc)
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	// Every twin left holding a socket: per id, at most one is still served.
	perID := map[string]int{}
	mu.Lock()
	for _, h := range open {
		h.c.conn.Write([]byte{0xC0, 0x00}) // PINGREQ
		if typ, _, err := h.c.tryRead(time.Second); err == nil && typ>>4 == 13 {
			perID[h.id]++
		}
		defer h.c.conn.Close()
	}
	mu.Unlock()
	for id, n := range perID {
		if n > 1 {
			t.Errorf("%s: %d twins still get PINGRESP after the fight", id, n)
		}
	}
	if n := v3Disconnects.Load(); n > 0 {
		t.Errorf("MQTT 3 twins were sent %d DISCONNECT packets", n)
	}
	// Every session that ended while the twins fought was a takeover.
	cut := time.Now()
	total := int(connects.Load())
	if total < ids*4 {
		t.Fatalf("only %d connects in 3 s; the twins did not fight", total)
	}
	wantTakeovers := total - ids // each id's last session is still live
	var got map[fleet.Reason]int
	waitUntil := time.Now().Add(5 * time.Second)
	for {
		got = map[fleet.Reason]int{}
		rows, err := e.pool.Query(context.Background(), `SELECT reason, count(*) FROM device_events
			WHERE kind = 'disconnect' AND device_id LIKE 'twin-%' AND at < $1 GROUP BY 1`, cut)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var r fleet.Reason
			var n int
			rows.Scan(&r, &n)
			got[r] = n
		}
		rows.Close()
		if got[fleet.ReasonSessionTakeover] >= wantTakeovers || time.Now().After(waitUntil) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%d connects, disconnects by reason: %v", total, got)
	for r, n := range got {
		if r != fleet.ReasonSessionTakeover {
			t.Errorf("%d sessions ended as %s while twins took each other over; want every one session_takeover", n, r)
		}
	}
	if got[fleet.ReasonSessionTakeover] < wantTakeovers {
		t.Errorf("%d takeovers recorded, want %d", got[fleet.ReasonSessionTakeover], wantTakeovers)
	}
}
