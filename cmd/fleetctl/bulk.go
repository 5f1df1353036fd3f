package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/fleetd/fleetd/command"
)

// list is a flag that may be repeated, each value also split at commas.
type list []string

func (l *list) String() string { return strings.Join(*l, ",") }
func (l *list) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// commands runs the bulk command subcommands: send, list, show, devices,
// cancel.
func (c *cli) commands(ctx context.Context, sub string, args []string) error {
	switch sub {
	case "send":
		return c.bulkSend(ctx, args)
	case "list":
		page, err := c.api.Bulks(ctx, "", 50)
		if err != nil {
			return err
		}
		return c.print(page.Bulks, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "CREATED\tID\tNAME\tSTATE\tTOTAL\tSUCCEEDED\tFAILED\tIN FLIGHT")
			for _, b := range page.Bulks {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\n", b.CreatedAt.Format(time.RFC3339), b.ID, b.Name, b.State, b.Total,
					b.Counts.Succeeded, b.Counts.Failed, b.Counts.InFlight())
			}
		})
	case "show":
		id, err := needID(args, "commands show")
		if err != nil {
			return err
		}
		b, err := c.api.Bulk(ctx, id)
		if err != nil {
			return err
		}
		return c.print(b, func(w *tabwriter.Writer) { bulkTable(w, b) })
	case "devices":
		id, err := needID(args, "commands devices")
		if err != nil {
			return err
		}
		fs := flag.NewFlagSet("commands devices", flag.ContinueOnError)
		fs.SetOutput(c.stderr)
		state := fs.String("state", "", "only devices in this state ("+strings.Join(command.TargetStates, ", ")+")")
		limit := fs.Int("limit", 50, "devices shown (1-200)")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		page, err := c.api.BulkDevices(ctx, id, *state, "", *limit)
		if err != nil {
			return err
		}
		return c.print(page.Devices, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "DEVICE\tSTATE\tCOMMAND\tRESULT")
			for _, d := range page.Devices {
				res := clipResult(d.Result, 60)
				if d.Skipped != "" {
					res = d.Skipped
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", d.DeviceID, d.State, d.CommandID, res)
			}
		})
	case "cancel":
		id, err := needID(args, "commands cancel")
		if err != nil {
			return err
		}
		b, err := c.api.CancelBulk(ctx, id)
		if err != nil {
			return err
		}
		return c.print(b, func(w *tabwriter.Writer) { bulkTable(w, b) })
	}
	return fmt.Errorf("unknown command commands %s (want send, list, show, devices or cancel)", sub)
}

// bulkSend sends a bulk command (commands send [selector flags] NAME
// [PARAMS]) and, with -wait, polls until it is no longer running; waiting,
// it fails unless every device answered succeeded.
func (c *cli) bulkSend(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("commands send", flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	var models, tags list
	fs.Var(&models, "model", "select devices of this model (repeatable, or a,b)")
	fs.Var(&tags, "tag", "select devices carrying this tag, e.g. site=lyon (repeatable: all of them)")
	firmware := fs.String("firmware", "", "select devices whose firmware meets this semver constraint, e.g. '<2.0.0'")
	incompatible := fs.Bool("incompatible", false, "select only devices fleetd found incompatible")
	all := fs.Bool("all", false, "select every active device (no other selector)")
	maxConcurrent := fs.Int("max-concurrent", 0, "commands in flight at once (default 100)")
	perMinute := fs.Int("per-minute", 0, "commands created per minute (default no rate limit)")
	timeout := fs.Duration("timeout", 0, "how long each device has to answer once delivered (default 30s)")
	expires := fs.Duration("expires-in", 0, "how long each command may wait for an offline device (default 10m)")
	wait := fs.Bool("wait", false, "wait until every device's command finished, then show the summary")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rest := fs.Args()
	if len(rest) < 1 || len(rest) > 2 || rest[0] == "" {
		return errors.New("commands send: want [selector flags] NAME [PARAMS_JSON]")
	}
	req := command.BulkRequest{
		Request:  command.Request{Name: rest[0], Timeout: command.Duration(*timeout), ExpiresIn: command.Duration(*expires)},
		Selector: command.Selector{Models: models, Tags: tags, Version: *firmware, All: *all},
		Pacing:   command.Pacing{MaxConcurrent: *maxConcurrent, DevicesPerMinute: *perMinute},
	}
	if *incompatible {
		req.Selector.Compat = "incompatible"
	}
	if len(rest) == 2 {
		if !json.Valid([]byte(rest[1])) {
			return errors.New("commands send: PARAMS is not JSON")
		}
		req.Params = json.RawMessage(rest[1])
	}
	b, err := c.api.SendBulk(ctx, req)
	if err != nil {
		return err
	}
	for *wait && b.State == command.BulkRunning {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
		if b, err = c.api.Bulk(ctx, b.ID); err != nil {
			return err
		}
	}
	if err := c.print(b, func(w *tabwriter.Writer) { bulkTable(w, b) }); err != nil {
		return err
	}
	if *wait && b.Counts.Succeeded != b.Total {
		return fmt.Errorf("bulk command %s %s: %d of %d succeeded", b.ID, b.State, b.Counts.Succeeded, b.Total)
	}
	return nil
}

func bulkTable(w *tabwriter.Writer, b command.Bulk) {
	fmt.Fprintf(w, "id\t%s\nname\t%s\nstate\t%s\n", b.ID, b.Name, b.State)
	sel, _ := json.Marshal(b.Selector)
	fmt.Fprintf(w, "selector\t%s\n", sel)
	rate := "no rate limit"
	if b.Pacing.DevicesPerMinute > 0 {
		rate = fmt.Sprintf("%d devices per minute", b.Pacing.DevicesPerMinute)
	}
	fmt.Fprintf(w, "pacing\t%d in flight at most, %s\n", b.Pacing.MaxConcurrent, rate)
	fmt.Fprintf(w, "total\t%d\n", b.Total)
	n := b.Counts
	for _, r := range []struct {
		name string
		v    int
	}{{"pending", n.Pending}, {"queued", n.Queued}, {"delivered", n.Delivered}, {"succeeded", n.Succeeded}, {"failed", n.Failed},
		{"timed_out", n.TimedOut}, {"expired", n.Expired}, {"skipped", n.Skipped}, {"cancelled", n.Cancelled}} {
		fmt.Fprintf(w, "  %s\t%d\n", r.name, r.v)
	}
	fmt.Fprintf(w, "created\t%s\n", b.CreatedAt.Format(time.RFC3339))
	if b.FinishedAt != nil {
		fmt.Fprintf(w, "finished\t%s (%s)\n", b.FinishedAt.Format(time.RFC3339), b.FinishedAt.Sub(b.CreatedAt).Round(time.Millisecond))
	}
}
