package broker

import (
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// idLocks serialise the connects of one client id from the end of its
// authentication to its CONNACK. mochi looks up the session an id already
// has and registers the new client as two separate steps
// (inheritClientSession, then Clients.Add): two CONNECTs of one id racing
// through them both take over the old session and then both stay connected,
// one of them no longer in the client index, so nothing ever ends it — two
// live sessions under one id ([MQTT-3.1.4-2] wants the older one closed).
// Held per id, not striped, so that a takeover stuck writing to a frozen
// device holds up only that id.
type idLocks struct {
	mu    sync.Mutex
	locks map[string]*idLock
}

type idLock struct {
	mu   sync.Mutex
	refs int
}

// lock takes id's lock and returns its release, which may be called more
// than once.
func (l *idLocks) lock(id string) (release func()) {
	l.mu.Lock()
	if l.locks == nil {
		l.locks = map[string]*idLock{}
	}
	e, ok := l.locks[id]
	if !ok {
		e = &idLock{}
		l.locks[id] = e
	}
	e.refs++
	l.mu.Unlock()
	e.mu.Lock()
	var once sync.Once
	return func() {
		once.Do(func() {
			e.mu.Unlock()
			l.mu.Lock()
			if e.refs--; e.refs == 0 {
				delete(l.locks, id)
			}
			l.mu.Unlock()
		})
	}
}

// OnSessionEstablish runs, under the id's lock, just before mochi takes the
// old session of the id over. It marks that session as taken over, so that
// its end is recorded as session_takeover whatever the socket said first (a
// device that closes its socket on the DISCONNECT would otherwise be
// recorded as connection_lost), and ends an MQTT 3 session by closing its
// socket: MQTT 3.1 and 3.1.1 define no DISCONNECT from the server, which
// mochi would send.
func (h *hook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	defer h.recover(cl, "OnSessionEstablish", nil)
	existing, ok := h.b.srv.Clients.Get(cl.ID)
	if !ok || existing == cl {
		return
	}
	if v, ok := h.b.sessions.Load(existing); ok {
		v.(*session).takenOver.Store(true)
	}
	if existing.Properties.ProtocolVersion < 5 && !existing.Closed() {
		existing.Stop(packets.ErrSessionTakenOver)
	}
}

// awaitTakeover holds a taken-over session's goroutine until mochi has
// marked it taken over. mochi stops the old client before it sets that mark
// (inheritClientSession), and the old client's clean-up, which runs right
// after OnDisconnect, removes the client id from the index unless the mark
// is set: it would remove the new session's entry, leaving that session
// unreachable by the next takeover — and two live sessions under one id.
// The new session's goroutine sets the mark moments later, holding the
// id's lock; the wait is bounded in case it never does.
func awaitTakeover(cl *mqtt.Client) {
	for i := 0; i < 2000 && !cl.IsTakenOver(); i++ {
		time.Sleep(time.Millisecond)
	}
}
