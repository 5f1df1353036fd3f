package sim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/eclipse/paho.golang/paho"
	pahov3 "github.com/eclipse/paho.mqtt.golang"
)

// request is a message on a device's command topics, with what MQTT 5
// adds to a request: where to answer and the data to answer with.
type request struct {
	Topic           string
	Payload         []byte
	ResponseTopic   string
	CorrelationData []byte
}

func requestOf(p *paho.Publish) request {
	r := request{Topic: p.Topic, Payload: p.Payload}
	if p.Properties != nil {
		r.ResponseTopic, r.CorrelationData = p.Properties.ResponseTopic, p.Properties.CorrelationData
	}
	return r
}

func (s *v3Session) SubscribeRequests(ctx context.Context, filter string, handle func(request)) error {
	tok := s.c.Subscribe(filter, 1, func(_ pahov3.Client, m pahov3.Message) { handle(request{Topic: m.Topic(), Payload: m.Payload()}) })
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-s.done:
		return errors.New("connection lost")
	}
}

func (s *v3Session) Respond(ctx context.Context, topic string, payload, _ []byte) error {
	return s.Publish(ctx, topic, payload, 1, false)
}

func (s *v5Session) SubscribeRequests(ctx context.Context, filter string, handle func(request)) error {
	s.mu.Lock()
	s.filters[filter] = handle
	s.mu.Unlock()
	return s.subscribe(ctx, filter)
}

func (s *v5Session) Respond(ctx context.Context, topic string, payload, correlation []byte) error {
	p := &paho.Publish{Topic: topic, QoS: 1, Payload: payload}
	if len(correlation) > 0 {
		p.Properties = &paho.PublishProperties{CorrelationData: correlation}
	}
	_, err := s.c.Publish(ctx, p)
	return err
}

// requestRoute returns the SubscribeRequests handler whose filter matches
// topic. s.mu is held.
func (s *v5Session) requestRoute(topic string) func(request) {
	for f, h := range s.filters {
		if topicMatches(f, topic) {
			return h
		}
	}
	return nil
}

// topicMatches reports whether an MQTT filter ("+", trailing "#") matches
// a topic name.
func topicMatches(filter, topic string) bool {
	fs, ts := strings.Split(filter, "/"), strings.Split(topic, "/")
	for i, f := range fs {
		if f == "#" {
			return true
		}
		if i >= len(ts) || (f != "+" && f != ts[i]) {
			return false
		}
	}
	return len(fs) == len(ts)
}

// commandMessage is the payload of devices/{id}/cmd/{name} (README: device
// protocol).
type commandMessage struct {
	ID     string          `json:"id"`
	Name   string          `json:"name"`
	Params json.RawMessage `json:"params"`
}

// commandResponse is the payload of devices/{id}/cmd/response. MQTT 5
// devices answer with the Correlation Data and leave the id out, as the
// protocol allows.
type commandResponse struct {
	ID     string `json:"id,omitempty"`
	Status string `json:"status"`
	Result any    `json:"result,omitempty"`
}

// maxLogLines bounds what get_logs returns, as firmware with a small ring
// buffer would.
const maxLogLines = 50

// handleCommand runs a command as firmware would: ping answers at once,
// get_logs sends its last lines (params {"lines":N}, at most 50), reboot
// answers and then restarts (the session drops; the device reconnects after
// a short delay); any other name fails. A command id seen before is
// ignored: the server sends a command again until it is answered.
func (d *device) handleCommand(ctx context.Context, sess session, protocol int, r request) sessionEnd {
	var m commandMessage
	if err := json.Unmarshal(r.Payload, &m); err != nil || m.ID == "" {
		d.sim.logger.Warn("ignoring a malformed command", "device_id", d.id, "payload", truncate(r.Payload, 200))
		return endContinue
	}
	if d.commandsSeen[m.ID] {
		d.sim.stats.count("command duplicates")
		return endContinue
	}
	if len(d.commandsSeen) >= 256 {
		d.commandsSeen = map[string]bool{}
	}
	d.commandsSeen[m.ID] = true
	d.sim.stats.count("commands")
	resp := commandResponse{ID: m.ID, Status: "succeeded"}
	end := endContinue
	switch m.Name {
	case "ping":
		resp.Result = map[string]any{"pong": true, "uptime_s": int(time.Since(d.booted).Seconds()), "firmware": d.firmware}
	case "get_logs":
		var p struct {
			Lines int `json:"lines"`
		}
		_ = json.Unmarshal(m.Params, &p)
		if p.Lines <= 0 || p.Lines > maxLogLines {
			p.Lines = maxLogLines
		}
		lines := make([]string, 0, p.Lines)
		for i := range p.Lines {
			lines = append(lines, fmt.Sprintf("%s [%s] boot+%ds line %d: ok", time.Now().UTC().Format(time.RFC3339), d.id, int(time.Since(d.booted).Seconds()), i+1))
		}
		resp.Result = map[string]any{"lines": lines}
	case "reboot":
		resp.Result = map[string]any{"rebooting": true}
		end = endReboot
	default:
		resp.Status = "failed"
		resp.Result = map[string]any{"error": "unknown command " + m.Name}
	}
	topic := "devices/" + d.id + "/cmd/response"
	if protocol == 5 && r.ResponseTopic != "" && len(r.CorrelationData) > 0 {
		topic, resp.ID = r.ResponseTopic, ""
	}
	payload, _ := json.Marshal(resp)
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := sess.Respond(pctx, topic, payload, r.CorrelationData); err != nil {
		d.sim.logger.Debug("command response not sent", "device_id", d.id, "command_id", m.ID, "err", err)
		return endLost
	}
	d.sim.stats.sent()
	d.sim.stats.count("command responses")
	if end == endReboot {
		d.booted = time.Now()
		d.sim.stats.count("command reboots")
	}
	return end
}
