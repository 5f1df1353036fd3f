package sim_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/brokertest"
	"github.com/fleetd/fleetd/sim"
)

// TestCommands: simulated devices on MQTT 3.1.1 and 5 answer commands sent
// by the real command service: ping and get_logs succeed with a result
// (get_logs bounded to 50 lines), an unknown command fails, reboot succeeds
// and the device then drops and comes back with a new session.
func TestCommands(t *testing.T) {
	env := brokertest.Start(t, nil)
	svc := command.NewService(command.NewStore(env.Pool), env.Broker, env.Recorder, command.Options{PollInterval: 20 * time.Millisecond})
	env.Broker.HandleMessage("cmd/response", func(s broker.Session, m broker.Message) error {
		return svc.HandleResponse(command.Session{DeviceID: s.DeviceID, Epoch: s.Epoch}, m.Payload, m.CorrelationData)
	})
	env.Broker.OnSubscribe("cmd/#", svc.DeviceListening)
	runCtx, stopRun := context.WithCancel(context.Background())
	defer stopRun()
	go svc.Run(runCtx)

	tokens := map[string]string{"cmd311-0": env.Register(t, "cmd311-0", "gw-100"), "cmd5-0": env.Register(t, "cmd5-0", "gw-100")}
	tokFile := filepath.Join(t.TempDir(), "tokens.json")
	b, _ := json.Marshal(tokens)
	os.WriteFile(tokFile, b, 0o600)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + env.Addrs["tcp"]},
		Run:    sim.RunOptions{Duration: secs(60), TokensFile: tokFile},
		Cohorts: []sim.Cohort{
			{Name: "cmd311", Count: 1, Model: "gw-100", Firmware: "1.0.0", Protocol: "3.1.1"},
			{Name: "cmd5", Count: 1, Model: "gw-100", Firmware: "1.0.0", Protocol: "5"},
		},
	}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := sim.New(context.Background(), f, sim.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan sim.Summary)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()

	for id := range tokens {
		t.Run(id, func(t *testing.T) {
			waitFor(t, id+" listening", 10*time.Second, func() bool { return env.Broker.Listening(id, "cmd/ping") })
			run := func(name, params string) command.Command {
				t.Helper()
				c, err := svc.Create(ctx, id, command.Request{Name: name, Params: json.RawMessage(params), Timeout: command.Duration(5 * time.Second)})
				if err != nil {
					t.Fatal(err)
				}
				c, err = svc.Wait(ctx, id, c.ID, 10*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				return c
			}
			if c := run("ping", ""); c.State != command.StateSucceeded || !json.Valid(c.Result) || len(c.Result) < 10 {
				t.Fatalf("ping: %s %s", c.State, c.Result)
			}
			var logs struct{ Lines []string }
			if c := run("get_logs", `{"lines":3}`); c.State != command.StateSucceeded || json.Unmarshal(c.Result, &logs) != nil || len(logs.Lines) != 3 {
				t.Fatalf("get_logs 3: %s %s", c.State, c.Result)
			}
			if c := run("get_logs", `{"lines":100000}`); c.State != command.StateSucceeded || json.Unmarshal(c.Result, &logs) != nil || len(logs.Lines) != 50 {
				t.Fatalf("get_logs is not bounded: %d lines", len(logs.Lines))
			}
			if c := run("self_destruct", ""); c.State != command.StateFailed {
				t.Fatalf("unknown command: %s %s", c.State, c.Result)
			}
			before, _ := env.Service.Get(ctx, id)
			if c := run("reboot", ""); c.State != command.StateSucceeded {
				t.Fatalf("reboot: %s %s", c.State, c.Result)
			}
			waitFor(t, id+" back after its reboot", 10*time.Second, func() bool {
				d, err := env.Service.Get(ctx, id)
				return err == nil && d.Online && d.SessionEpoch > before.SessionEpoch && env.Broker.Listening(id, "cmd/ping")
			})
			// And it still answers, on its new session.
			if c := run("ping", ""); c.State != command.StateSucceeded {
				t.Fatalf("ping after the reboot: %s", c.State)
			}
		})
	}
	events, _ := env.Service.Events(ctx, "cmd5-0", nil, 100)
	for _, e := range events {
		if e.Kind == fleet.KindRejected {
			t.Errorf("the simulator's answers were refused: %s", e.Detail)
		}
	}
}
