package firmware

import "sync"

// deviceNote is something a device did that a campaign may be waiting for.
type deviceNote struct {
	deviceID, firmware string
	listening          bool // subscribed to its job topic (else: a birth)
}

// noteQueue carries device notes from the broker's hooks to the dispatcher
// without blocking the hooks and without ever dropping a note: notes are
// coalesced per device (a birth keeps the latest firmware, a subscription is
// a flag), so the queue holds at most one entry per device however fast one
// device repeats itself (the broker's per-session rates bound that too), and
// one device's flood cannot push out another device's birth.
type noteQueue struct {
	mu      sync.Mutex
	pending map[string]*pendingNote
	wake    chan struct{}
}

type pendingNote struct {
	birth     bool
	firmware  string
	listening bool
}

func newNoteQueue() *noteQueue {
	return &noteQueue{pending: map[string]*pendingNote{}, wake: make(chan struct{}, 1)}
}

func (q *noteQueue) add(n deviceNote) {
	q.mu.Lock()
	p, ok := q.pending[n.deviceID]
	if !ok {
		p = &pendingNote{}
		q.pending[n.deviceID] = p
	}
	if n.listening {
		p.listening = true
	} else {
		p.birth, p.firmware = true, n.firmware
	}
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// take returns every pending note and empties the queue. A device's birth
// comes before its subscription, the order devices send them in: a birth on
// the target version settles the job that the subscription would resend.
func (q *noteQueue) take() []deviceNote {
	q.mu.Lock()
	pending := q.pending
	q.pending = map[string]*pendingNote{}
	q.mu.Unlock()
	out := make([]deviceNote, 0, len(pending))
	for id, p := range pending {
		if p.birth {
			out = append(out, deviceNote{deviceID: id, firmware: p.firmware})
		}
		if p.listening {
			out = append(out, deviceNote{deviceID: id, listening: true})
		}
	}
	return out
}
