// Package wsconn presents a WebSocket connection as the byte stream MQTT
// expects ([MQTT-6.0.0-1]: binary frames only; a frame may hold part of a
// packet or several packets). The broker uses it for its WebSocket listener
// and the simulator for WebSocket devices.
package wsconn

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// Conn is a net.Conn over a WebSocket connection.
type Conn struct {
	ws *websocket.Conn
	r  io.Reader
	// wmu serialises writes with write-deadline changes: mochi refreshes the
	// deadline from the reader goroutine while its write loop writes, which a
	// net.Conn allows but gorilla's Conn does not.
	wmu sync.Mutex
}

// New wraps a WebSocket connection.
func New(ws *websocket.Conn) *Conn { return &Conn{ws: ws} }

// ClosedError is a WebSocket close handshake or an abnormal closure.
type ClosedError struct {
	Code int
	Text string
}

func (e *ClosedError) Error() string {
	if e.Code == websocket.CloseAbnormalClosure {
		return "websocket connection lost"
	}
	return fmt.Sprintf("websocket closed by the peer (code %d %s)", e.Code, e.Text)
}

var errTextFrame = errors.New("websocket text frame: MQTT over WebSocket uses binary frames [MQTT-6.0.0-1]")

func (c *Conn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			typ, r, err := c.ws.NextReader()
			if err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					return 0, &ClosedError{Code: ce.Code, Text: ce.Text}
				}
				return 0, err
			}
			if typ != websocket.BinaryMessage {
				return 0, errTextFrame
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

// Write sends one binary frame. mochi serialises writes per client.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *Conn) Close() error                      { return c.ws.Close() }
func (c *Conn) NetConn() net.Conn                 { return c.ws.NetConn() }
func (c *Conn) LocalAddr() net.Addr               { return c.ws.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr              { return c.ws.RemoteAddr() }
func (c *Conn) SetReadDeadline(t time.Time) error { return c.ws.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.ws.SetWriteDeadline(t)
}
func (c *Conn) SetDeadline(t time.Time) error {
	if err := c.ws.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}
