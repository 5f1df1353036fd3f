// Command fleetctl is the operator's command line over fleetd's REST API.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/web/client"
)

const usage = `fleetctl talks to fleetd's REST API.

Usage: fleetctl [-url URL] [-token-file FILE] [-output table|json] COMMAND

  devices list [-status online|offline] [-model M] [-firmware V] [-protocol 3.1|3.1.1|5] [-compat incompatible] [-limit N]
  devices get ID | diagnose ID | events ID | decommission ID | rotate ID
  devices register ID [-model M] [-tags a,b]
  devices exec ID NAME [-params JSON] [-timeout 30s] [-expires-in 10m] [-wait]
                           send a command; -wait waits for its outcome (exit 1 unless succeeded)
  devices commands ID      the device's recent commands
  commands send [-model M]... [-tag K=V]... [-firmware '<2.0.0'] [-incompatible] [-all]
                [-max-concurrent N] [-per-minute N] [-timeout 30s] [-expires-in 10m] [-wait] NAME [PARAMS_JSON]
                           send a command to every device the selector matches, paced (a bulk command)
  commands list | show ID | devices ID [-state S] | cancel ID
  config get ID | get -layer SCOPE | diff ID | layers | delete SCOPE
  config set ID|-layer SCOPE [-merge] (JSON | -f FILE)
                           a device's own layer, or a layer (SCOPE: fleet, model:M, tag:T, model:M,tag:T);
                           whole, or a JSON merge patch with -merge; diff exits 1 unless in sync
  firmware list
  firmware upload FILE -version V -models a,b [-notes TEXT]
  campaign list | get ID | history ID | devices ID
  campaign create -f SPEC.yaml|SPEC.json
  campaign start|pause|resume|abort|rollback ID
  campaign watch ID        live progress until the campaign stops moving
  fleet health
  rules get | rules set -f RULES.json
  whoami                   who the token is, and its role
  users list | create NAME -role R [-password-file FILE] | set-role ID|NAME ROLE
  users disable|enable|delete ID|NAME
                           (admin) the password comes from -password-file or the first line of stdin
  keys list | create NAME -role R [-expires-in 90d] | revoke ID
                           (admin) create prints the key's token, once
  audit [-since 24h] [-principal P] [-method M] [-route PATTERN] [-target ID] [-request-id ID]
        [-outcome success|failure|CODE] [-limit N] [-jsonl]
                           (admin) the audit log, newest first; -jsonl streams every entry

Settings: -url or FLEETD_URL (default http://127.0.0.1:8080); an API key (fk_…, see keys create)
from -token-file, FLEETD_API_KEY_FILE or FLEETD_API_KEY, or the bootstrap (break-glass) admin
token from FLEETD_ADMIN_TOKEN_FILE or FLEETD_ADMIN_TOKEN. -token TOKEN works too, but every local
user sees it in ps: prefer a file.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "fleetctl:", err)
		os.Exit(1)
	}
}

type cli struct {
	api    *client.Client
	out    io.Writer
	json   bool
	stderr io.Writer
	stdin  io.Reader
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("fleetctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	url := fs.String("url", or(getenv("FLEETD_URL"), "http://127.0.0.1:8080"), "fleetd's HTTP address")
	token := fs.String("token", "", "API key or admin token (visible to every local user in ps: prefer -token-file)")
	tokenFile := fs.String("token-file", or(getenv("FLEETD_API_KEY_FILE"), getenv("FLEETD_ADMIN_TOKEN_FILE")), "file holding an API key (fk_…) or the bootstrap admin token")
	output := fs.String("output", "table", "table or json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	// The token (an API key or the bootstrap admin token) comes from, in
	// order: -token (warned about), -token-file, FLEETD_API_KEY_FILE or
	// FLEETD_ADMIN_TOKEN_FILE, FLEETD_API_KEY, FLEETD_ADMIN_TOKEN.
	switch {
	case *token != "":
		fmt.Fprintln(stderr, "fleetctl: warning: -token shows the admin token or API key to every local user (ps, shell history); use -token-file or FLEETD_API_KEY_FILE")
	case *tokenFile != "":
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			return fmt.Errorf("token file (-token-file, FLEETD_API_KEY_FILE, FLEETD_ADMIN_TOKEN_FILE): %w", err)
		}
		*token = strings.TrimSpace(string(b))
	default:
		*token = or(getenv("FLEETD_API_KEY"), getenv("FLEETD_ADMIN_TOKEN"))
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("-output must be table or json, not %q", *output)
	}
	rest := fs.Args()
	if len(rest) < 1 {
		fmt.Fprint(stderr, usage)
		return errors.New("missing command")
	}
	if *token == "" {
		return errors.New("no token: use -token-file, FLEETD_API_KEY_FILE or FLEETD_API_KEY (an API key), or FLEETD_ADMIN_TOKEN_FILE (the bootstrap token)")
	}
	c := &cli{api: client.New(*url, *token), out: stdout, json: *output == "json", stderr: stderr, stdin: os.Stdin}
	cmd, sub := rest[0], ""
	if len(rest) > 1 {
		sub = rest[1]
	}
	tail := rest[min(2, len(rest)):]
	switch cmd {
	case "devices":
		return c.devices(ctx, sub, tail)
	case "config":
		return c.config(ctx, sub, tail)
	case "firmware":
		return c.firmware(ctx, sub, tail)
	case "campaign", "campaigns":
		return c.campaign(ctx, sub, tail)
	case "commands":
		return c.commands(ctx, sub, tail)
	case "fleet":
		if sub != "health" {
			return fmt.Errorf("unknown command fleet %s (want fleet health)", sub)
		}
		h, err := c.api.FleetHealth(ctx)
		if err != nil {
			return err
		}
		return c.print(h, func(w *tabwriter.Writer) {
			fmt.Fprintf(w, "devices\t%d\tonline\t%d\toffline\t%d\n", h.Devices.Total, h.Devices.Online, h.Devices.Offline)
			fmt.Fprintf(w, "incompatible\t%d\t%v\n", h.Incompatible.Devices, h.Incompatible.ByReason)
			for _, v := range h.FlaggedFirmware {
				evidence := ""
				if v.Evidence != nil {
					evidence = v.Evidence.Evidence
				}
				fmt.Fprintf(w, "flagged\t%s %s\t%s\t%s\n", v.Model, v.Firmware, v.Flag, evidence)
			}
			fmt.Fprintln(w, "\nlast hour\tfirmware\tprotocol\treason\tcount")
			for _, d := range h.Disconnects.LastHour {
				fmt.Fprintf(w, "\t%s\t%s\t%s\t%d\n", d.Firmware, d.Protocol, d.Reason, d.Count)
			}
		})
	case "rules":
		return c.rules(ctx, sub, tail)
	case "users":
		return c.users(ctx, sub, tail)
	case "keys":
		return c.keys(ctx, sub, tail)
	case "audit":
		return c.audit(ctx, rest[1:])
	case "whoami":
		p, err := c.api.Me(ctx)
		if err != nil {
			return err
		}
		return c.print(p, func(w *tabwriter.Writer) { fmt.Fprintf(w, "%s %s (%s), role %s\n", p.Kind, p.Name, p.ID, p.Role) })
	case "help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return fmt.Errorf("unknown command %q (see fleetctl -h)", cmd)
}

// print writes v as JSON, or as a table drawn by table.
func (c *cli) print(v any, table func(*tabwriter.Writer)) error {
	if c.json {
		enc := json.NewEncoder(c.out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	table(w)
	return w.Flush()
}

func needID(args []string, what string) (string, error) {
	if len(args) == 0 || args[0] == "" {
		return "", fmt.Errorf("%s: missing ID", what)
	}
	return args[0], nil
}

func (c *cli) devices(ctx context.Context, sub string, args []string) error {
	switch sub {
	case "list":
		fs := flag.NewFlagSet("devices list", flag.ContinueOnError)
		fs.SetOutput(c.stderr)
		var q client.DeviceQuery
		fs.StringVar(&q.Status, "status", "", "online or offline")
		fs.StringVar(&q.Model, "model", "", "model")
		fs.StringVar(&q.Firmware, "firmware", "", "firmware version")
		fs.StringVar(&q.Protocol, "protocol", "", "3.1, 3.1.1 or 5")
		fs.StringVar(&q.Compat, "compat", "", "incompatible or compatible")
		fs.IntVar(&q.Limit, "limit", 100, "page size")
		all := fs.Bool("all", false, "follow the cursor to the last page")
		if err := fs.Parse(args); err != nil {
			return err
		}
		var devices []fleet.Device
		for {
			page, err := c.api.Devices(ctx, q)
			if err != nil {
				return err
			}
			devices = append(devices, page.Devices...)
			if !*all || page.NextCursor == "" {
				break
			}
			q.Cursor = page.NextCursor
		}
		if devices == nil {
			devices = []fleet.Device{}
		}
		return c.print(devices, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "ID\tMODEL\tFIRMWARE\tPROTOCOL\tONLINE\tLAST DISCONNECT\tINCOMPATIBLE")
			for _, d := range devices {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%v\t%s\t%v\n", d.ID, d.Model, d.Firmware, d.ProtocolVersion, d.Online, d.LastDisconnect, d.Incompatible)
			}
		})
	case "get":
		id, err := needID(args, "devices get")
		if err != nil {
			return err
		}
		d, err := c.api.Device(ctx, id)
		if err != nil {
			return err
		}
		return c.print(d, func(w *tabwriter.Writer) {
			fmt.Fprintf(w, "id\t%s\nmodel\t%s\nstate\t%s\nfirmware\t%s\nprotocol\t%s\nonline\t%v\nlast seen\t%v\nlast disconnect\t%s\nkeepalive\t%d s (asked %d s)\nremote\t%s\nincompatible\t%v\n",
				d.ID, d.Model, d.State, d.Firmware, d.ProtocolVersion, d.Online, fmtTime(d.LastSeen), d.LastDisconnect,
				d.KeepaliveEffective, d.KeepaliveRequested, d.RemoteAddr, d.Incompatible)
		})
	case "diagnose":
		id, err := needID(args, "devices diagnose")
		if err != nil {
			return err
		}
		d, err := c.api.Diagnosis(ctx, id)
		if err != nil {
			return err
		}
		return c.print(d, func(w *tabwriter.Writer) {
			if len(d.Problems) == 0 {
				fmt.Fprintf(w, "%s: no problems\n", id)
			}
			for _, p := range d.Problems {
				fmt.Fprintf(w, "%s\n  cause\t%s\n  fix\t%s\n", p.Code, p.Cause, p.Fix)
			}
		})
	case "events":
		id, err := needID(args, "devices events")
		if err != nil {
			return err
		}
		page, err := c.api.Events(ctx, id, "", 100)
		if err != nil {
			return err
		}
		return c.print(page.Events, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "AT\tKIND\tREASON\tDETAIL\tFIRMWARE\tPROTOCOL")
			for _, e := range page.Events {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", e.At.Format(time.RFC3339), e.Kind, e.Reason, e.Detail, e.Firmware, e.ProtocolVersion)
			}
		})
	case "register":
		id, err := needID(args, "devices register")
		if err != nil {
			return err
		}
		fs := flag.NewFlagSet("devices register", flag.ContinueOnError)
		fs.SetOutput(c.stderr)
		model := fs.String("model", "", "model")
		tags := fs.String("tags", "", "comma-separated tags")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		n := fleet.NewDevice{ID: id, Model: *model}
		if *tags != "" {
			n.Tags = strings.Split(*tags, ",")
		}
		reg, err := c.api.RegisterDevice(ctx, n)
		if err != nil {
			return err
		}
		return c.print(reg, func(w *tabwriter.Writer) {
			fmt.Fprintf(w, "registered\t%s\ntoken\t%s\t(shown once: give it to the device)\n", reg.Device.ID, reg.Token)
		})
	case "exec":
		return c.exec(ctx, args)
	case "commands":
		id, err := needID(args, "devices commands")
		if err != nil {
			return err
		}
		page, err := c.api.Commands(ctx, id, "", 50)
		if err != nil {
			return err
		}
		return c.print(page.Commands, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "CREATED\tID\tNAME\tSTATE\tRESULT")
			for _, cmd := range page.Commands {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", cmd.CreatedAt.Format(time.RFC3339), cmd.ID, cmd.Name, cmd.State, clipResult(cmd.Result, 60))
			}
		})
	case "decommission":
		id, err := needID(args, "devices decommission")
		if err != nil {
			return err
		}
		d, err := c.api.Decommission(ctx, id)
		if err != nil {
			return err
		}
		return c.print(d, func(w *tabwriter.Writer) { fmt.Fprintf(w, "decommissioned\t%s\n", d.ID) })
	case "rotate":
		id, err := needID(args, "devices rotate")
		if err != nil {
			return err
		}
		tok, err := c.api.RotateToken(ctx, id)
		if err != nil {
			return err
		}
		return c.print(map[string]string{"id": id, "token": tok}, func(w *tabwriter.Writer) {
			fmt.Fprintf(w, "token\t%s\t(shown once)\n", tok)
		})
	}
	return fmt.Errorf("unknown command devices %q (see fleetctl -h)", sub)
}

func (c *cli) firmware(ctx context.Context, sub string, args []string) error {
	switch sub {
	case "list":
		arts, err := c.api.Firmware(ctx)
		if err != nil {
			return err
		}
		return c.print(arts, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "ID\tVERSION\tMODELS\tSIZE\tSHA256\tSIGNED BY")
			for _, a := range arts {
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s…\t%s\n", a.ID, a.Version, strings.Join(a.Models, ","), a.Size, a.SHA256[:16], a.SignedBy)
			}
		})
	case "upload":
		path, err := needID(args, "firmware upload (FILE)")
		if err != nil {
			return err
		}
		fs := flag.NewFlagSet("firmware upload", flag.ContinueOnError)
		fs.SetOutput(c.stderr)
		version := fs.String("version", "", "firmware version")
		models := fs.String("models", "", "comma-separated models")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		art, err := c.api.UploadFirmware(ctx, *version, strings.Split(*models, ","), f)
		if err != nil {
			return err
		}
		return c.print(art, func(w *tabwriter.Writer) {
			fmt.Fprintf(w, "uploaded\t%s\nversion\t%s\nsha256\t%s\nsigned by\t%s\n", art.ID, art.Version, art.SHA256, art.SignedBy)
		})
	}
	return fmt.Errorf("unknown command firmware %q (see fleetctl -h)", sub)
}

// readSpec reads YAML or JSON into v, refusing unknown fields. YAML goes
// through JSON so that durations read the same way as in the API.
func readSpec(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	b, err := json.Marshal(doc)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func (c *cli) campaign(ctx context.Context, sub string, args []string) error {
	switch sub {
	case "list":
		vs, err := c.api.Campaigns(ctx)
		if err != nil {
			return err
		}
		return c.print(vs, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "ID\tNAME\tVERSION\tSTATE\tSTAGE\tDEVICES")
			for _, v := range vs {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d/%d\t%d\n", v.ID, v.Name, v.Version, v.State, v.Stage+1, len(v.Stages), v.Total)
			}
		})
	case "create":
		fs := flag.NewFlagSet("campaign create", flag.ContinueOnError)
		fs.SetOutput(c.stderr)
		file := fs.String("f", "", "campaign spec (YAML or JSON)")
		if err := fs.Parse(args); err != nil {
			return err
		}
		if *file == "" {
			return errors.New("campaign create: -f SPEC is required")
		}
		var spec firmware.Spec
		if err := readSpec(*file, &spec); err != nil {
			return err
		}
		v, err := c.api.CreateCampaign(ctx, spec)
		if err != nil {
			return err
		}
		return c.print(v, func(w *tabwriter.Writer) { fmt.Fprintf(w, "created\t%s\tstate\t%s\n", v.ID, v.State) })
	case "get", "start", "pause", "resume", "abort", "rollback":
		id, err := needID(args, "campaign "+sub)
		if err != nil {
			return err
		}
		var v firmware.CampaignView
		if sub == "get" {
			v, err = c.api.Campaign(ctx, id)
		} else {
			v, err = c.api.CampaignAction(ctx, id, sub)
		}
		if err != nil {
			return err
		}
		return c.print(v, func(w *tabwriter.Writer) { progress(w, v) })
	case "history":
		id, err := needID(args, "campaign history")
		if err != nil {
			return err
		}
		hs, err := c.api.CampaignHistory(ctx, id)
		if err != nil {
			return err
		}
		return c.print(hs, func(w *tabwriter.Writer) {
			for _, h := range hs {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", h.At.Format(time.RFC3339), h.Actor, h.Action, h.Detail)
			}
		})
	case "devices":
		id, err := needID(args, "campaign devices")
		if err != nil {
			return err
		}
		ds, err := c.api.CampaignDevices(ctx, id)
		if err != nil {
			return err
		}
		return c.print(ds, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "DEVICE\tSTAGE\tFROM\tSTATE\tERROR")
			for _, d := range ds {
				stage := "-"
				if d.Stage != nil {
					stage = fmt.Sprint(*d.Stage + 1)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", d.DeviceID, stage, d.FromVersion, d.State, d.Error)
			}
		})
	case "watch":
		id, err := needID(args, "campaign watch")
		if err != nil {
			return err
		}
		return c.watch(ctx, id)
	}
	return fmt.Errorf("unknown command campaign %q (see fleetctl -h)", sub)
}

// watch redraws the campaign's progress once a second until it stops
// moving: completed, aborted, rolled back, or paused (by a gate or an
// operator). With -output json it prints one JSON line per change.
func (c *cli) watch(ctx context.Context, id string) error {
	last := ""
	for {
		v, err := c.api.Campaign(ctx, id)
		if err != nil {
			return err
		}
		b, _ := json.Marshal(v)
		if string(b) != last {
			last = string(b)
			if c.json {
				fmt.Fprintln(c.out, string(b))
			} else {
				w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
				fmt.Fprintf(w, "%s\n", time.Now().Format("15:04:05"))
				progress(w, v)
				w.Flush()
			}
		}
		switch v.State {
		case firmware.StateCompleted, firmware.StateAborted, firmware.StateRolledBack, firmware.StatePaused:
			if v.State == firmware.StatePaused && !c.json {
				if hs, err := c.api.CampaignHistory(ctx, id); err == nil && len(hs) > 0 {
					fmt.Fprintf(c.out, "paused: %s\n", hs[len(hs)-1].Detail)
				}
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// progress draws a campaign's state and one bar per stage.
func progress(w io.Writer, v firmware.CampaignView) {
	fmt.Fprintf(w, "%s\t%s\t→ %s\t%s\tstage %d/%d\n", v.ID, v.Name, v.Version, v.State, v.Stage+1, len(v.Stages))
	bars := v.Counts
	if v.Rollback != nil {
		bars = append(bars, *v.Rollback)
	}
	for _, sc := range bars {
		done, failed := sc.ByState["succeeded"], sc.ByState["failed"]+sc.ByState["timed_out"]
		fmt.Fprintf(w, "  %s\t%s\t%d/%d succeeded\t%d failed\n", sc.Name, bar(done, failed, sc.Targets, 30), done, sc.Targets, failed)
	}
}

func bar(done, failed, total, width int) string {
	if total == 0 {
		return "[" + strings.Repeat(" ", width) + "]"
	}
	d, f := done*width/total, failed*width/total
	return "[" + strings.Repeat("#", d) + strings.Repeat("x", f) + strings.Repeat("-", width-d-f) + "]"
}

func (c *cli) rules(ctx context.Context, sub string, args []string) error {
	switch sub {
	case "get":
		p, err := c.api.Policy(ctx)
		if err != nil {
			return err
		}
		enc := json.NewEncoder(c.out)
		enc.SetIndent("", "  ")
		return enc.Encode(p)
	case "set":
		fs := flag.NewFlagSet("rules set", flag.ContinueOnError)
		fs.SetOutput(c.stderr)
		file := fs.String("f", "", "policy document (YAML or JSON)")
		if err := fs.Parse(args); err != nil {
			return err
		}
		var p fleet.Policy
		if err := readSpec(*file, &p); err != nil {
			return err
		}
		saved, err := c.api.SetPolicy(ctx, p)
		if err != nil {
			return err
		}
		return c.print(saved, func(w *tabwriter.Writer) { fmt.Fprintln(w, "policy applied") })
	}
	return fmt.Errorf("unknown command rules %q (see fleetctl -h)", sub)
}

func fmtTime(t *time.Time) string {
	if t == nil {
		return "never"
	}
	return t.Format(time.RFC3339)
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
