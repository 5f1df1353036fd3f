package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/fleetd/fleetd/command"
)

// exec sends a command (devices exec ID NAME) and, with -wait, long-polls
// until it is answered, times out or expires. Waiting, it fails unless the
// device answered succeeded, so that scripts can test the outcome.
func (c *cli) exec(ctx context.Context, args []string) error {
	if len(args) < 2 || args[0] == "" || args[1] == "" {
		return errors.New("devices exec: want ID NAME")
	}
	id, name := args[0], args[1]
	fs := flag.NewFlagSet("devices exec", flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	params := fs.String("params", "", "parameters, a JSON object")
	timeout := fs.Duration("timeout", 0, "how long the device has to answer once delivered (default 30s)")
	expires := fs.Duration("expires-in", 0, "how long the command may wait for an offline device (default 10m)")
	wait := fs.Bool("wait", false, "wait for the outcome")
	if err := fs.Parse(args[2:]); err != nil {
		return err
	}
	req := command.Request{Name: name, Timeout: command.Duration(*timeout), ExpiresIn: command.Duration(*expires)}
	if *params != "" {
		if !json.Valid([]byte(*params)) {
			return errors.New("devices exec: -params is not JSON")
		}
		req.Params = json.RawMessage(*params)
	}
	cmd, err := c.api.SendCommand(ctx, id, req)
	if err != nil {
		return err
	}
	for *wait && !cmd.State.Final() {
		if cmd, err = c.api.Command(ctx, id, cmd.ID, time.Minute); err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	if err := c.print(cmd, func(w *tabwriter.Writer) {
		fmt.Fprintf(w, "id\t%s\nstate\t%s\n", cmd.ID, cmd.State)
		if len(cmd.Result) > 0 {
			fmt.Fprintf(w, "result\t%s\n", cmd.Result)
		}
	}); err != nil {
		return err
	}
	if *wait && cmd.State != command.StateSucceeded {
		return fmt.Errorf("command %s %s", cmd.ID, cmd.State)
	}
	return nil
}

// clipResult shows at most n bytes of a result in a table.
func clipResult(r json.RawMessage, n int) string {
	if len(r) > n {
		return string(r[:n]) + "…"
	}
	return string(r)
}
