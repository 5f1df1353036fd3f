package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/fleetd/fleetd/auth"
	"github.com/fleetd/fleetd/web/client"
)

// users runs the user commands (admin): list, create, set-role, disable,
// enable and delete. A user is named by id or by name.
func (c *cli) users(ctx context.Context, sub string, args []string) error {
	fs := flag.NewFlagSet("users "+sub, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	role := fs.String("role", "", "create: viewer, operator or admin")
	pwFile := fs.String("password-file", "", "create: read the password from FILE (default: the first line of stdin)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	switch sub {
	case "list":
		us, err := c.api.Users(ctx)
		if err != nil {
			return err
		}
		return c.print(us, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "ID\tNAME\tROLE\tDISABLED\tCREATED BY\tCREATED")
			for _, u := range us {
				fmt.Fprintf(w, "%s\t%s\t%s\t%v\t%s\t%s\n", u.ID, u.Name, u.Role, u.Disabled, u.CreatedBy, u.CreatedAt.Format(time.RFC3339))
			}
		})
	case "create":
		if len(pos) != 1 || *role == "" {
			return errors.New("usage: users create NAME -role viewer|operator|admin [-password-file FILE]")
		}
		pw, err := readPassword(*pwFile, c.stdin)
		if err != nil {
			return err
		}
		u, err := c.api.CreateUser(ctx, auth.NewUser{Name: pos[0], Role: auth.Role(*role), Password: pw})
		if err != nil {
			return err
		}
		return c.print(u, func(w *tabwriter.Writer) { fmt.Fprintf(w, "created user %s (%s), role %s\n", u.Name, u.ID, u.Role) })
	case "set-role", "disable", "enable", "delete":
		want := 1
		if sub == "set-role" {
			want = 2
		}
		if len(pos) != want {
			if sub == "set-role" {
				return errors.New("usage: users set-role ID|NAME viewer|operator|admin")
			}
			return fmt.Errorf("usage: users %s ID|NAME", sub)
		}
		id, err := c.userID(ctx, pos[0])
		if err != nil {
			return err
		}
		var p auth.UserPatch
		switch sub {
		case "delete":
			if err := c.api.DeleteUser(ctx, id); err != nil {
				return err
			}
			fmt.Fprintf(c.out, "deleted user %s\n", pos[0])
			return nil
		case "set-role":
			r := auth.Role(pos[1])
			p.Role = &r
		default:
			d := sub == "disable"
			p.Disabled = &d
		}
		u, err := c.api.UpdateUser(ctx, id, p)
		if err != nil {
			return err
		}
		return c.print(u, func(w *tabwriter.Writer) {
			fmt.Fprintf(w, "user %s (%s): role %s, disabled %v\n", u.Name, u.ID, u.Role, u.Disabled)
		})
	}
	return fmt.Errorf("unknown command users %s (want list, create, set-role, disable, enable or delete)", sub)
}

// userID resolves a user's name to its id; an id (u_…) is taken as is.
func (c *cli) userID(ctx context.Context, s string) (string, error) {
	if strings.HasPrefix(s, "u_") {
		return s, nil
	}
	us, err := c.api.Users(ctx)
	if err != nil {
		return "", err
	}
	for _, u := range us {
		if strings.EqualFold(u.Name, s) {
			return u.ID, nil
		}
	}
	return "", fmt.Errorf("no user named %q", s)
}

// readPassword reads a password from file, or the first line of stdin;
// never from the command line, where every local user would see it.
func readPassword(file string, stdin io.Reader) (string, error) {
	var line string
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("password file: %w", err)
		}
		line, _, _ = strings.Cut(string(b), "\n")
	} else {
		l, err := bufio.NewReader(io.LimitReader(stdin, 4096)).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("read the password from stdin: %w", err)
		}
		line = l
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return "", errors.New("no password: give -password-file FILE or write it on stdin")
	}
	return line, nil
}

// keys runs the API key commands (admin): list, create and revoke.
func (c *cli) keys(ctx context.Context, sub string, args []string) error {
	fs := flag.NewFlagSet("keys "+sub, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	role := fs.String("role", "", "create: viewer, operator or admin")
	expiresIn := fs.String("expires-in", "", "create: lifetime, e.g. 720h or 90d (default: no expiry)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	switch sub {
	case "list":
		ks, err := c.api.Keys(ctx)
		if err != nil {
			return err
		}
		return c.print(ks, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "ID\tNAME\tROLE\tCREATED BY\tEXPIRES\tREVOKED\tLAST USED")
			for _, k := range ks {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Name, k.Role, k.CreatedBy, when(k.ExpiresAt), when(k.RevokedAt), when(k.LastUsedAt))
			}
		})
	case "create":
		if len(pos) != 1 || *role == "" {
			return errors.New("usage: keys create NAME -role viewer|operator|admin [-expires-in 90d]")
		}
		k, err := c.api.CreateKey(ctx, client.NewKey{Name: pos[0], Role: auth.Role(*role), ExpiresIn: *expiresIn})
		if err != nil {
			return err
		}
		return c.print(k, func(w *tabwriter.Writer) {
			fmt.Fprintf(w, "created key %s (%s), role %s, expires %s\n", k.Name, k.ID, k.Role, when(k.ExpiresAt))
			fmt.Fprintf(w, "token (shown once; keep it in a file and use -token-file or FLEETD_API_KEY_FILE):\n%s\n", k.Token)
		})
	case "revoke":
		id, err := needID(pos, "keys revoke")
		if err != nil {
			return err
		}
		k, err := c.api.RevokeKey(ctx, id)
		if err != nil {
			return err
		}
		return c.print(k, func(w *tabwriter.Writer) { fmt.Fprintf(w, "revoked key %s (%s)\n", k.Name, k.ID) })
	}
	return fmt.Errorf("unknown command keys %s (want list, create or revoke)", sub)
}

func when(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

// audit reads the audit log (admin), newest first: a page as a table or
// JSON, or with -jsonl every matching entry streamed as JSON lines.
func (c *cli) audit(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("audit", flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	var q client.AuditQuery
	since := fs.Duration("since", 0, "entries of the last DURATION only, e.g. 24h")
	fs.StringVar(&q.Principal, "principal", "", "a principal's id or name")
	fs.StringVar(&q.Method, "method", "", "POST, PUT, PATCH or DELETE")
	fs.StringVar(&q.Route, "route", "", "a route pattern, e.g. /api/v1/devices/{id}")
	fs.StringVar(&q.Target, "target", "", "a target id (a device, a campaign)")
	fs.StringVar(&q.RequestID, "request-id", "", "a request id (campaign history names it)")
	fs.StringVar(&q.Outcome, "outcome", "", "success, failure or a status code")
	fs.IntVar(&q.Limit, "limit", 50, "entries (without -jsonl)")
	jsonl := fs.Bool("jsonl", false, "stream every matching entry as JSON lines")
	if _, err := parseInterleaved(fs, args); err != nil {
		return err
	}
	if *since < 0 {
		return errors.New("-since must not be negative")
	}
	if *since > 0 {
		q.From = time.Now().Add(-*since)
	}
	if *jsonl {
		q.Limit = 0
		return c.api.ExportAudit(ctx, q, c.out)
	}
	page, err := c.api.Audit(ctx, q)
	if err != nil {
		return err
	}
	return c.print(page, func(w *tabwriter.Writer) {
		fmt.Fprintln(w, "ID\tAT\tPRINCIPAL\tMETHOD\tPATH\tSTATUS\tREMOTE\tREQUEST")
		for _, e := range page.Entries {
			fmt.Fprintf(w, "%d\t%s\t%s %s\t%s\t%s\t%d\t%s\t%s\n", e.ID, e.At.UTC().Format(time.RFC3339), e.Principal.Kind, e.Principal.Name,
				e.Method, e.Path, e.Status, e.Remote, e.RequestID)
		}
		if page.NextCursor != "" {
			fmt.Fprintf(w, "(more: -limit, or -jsonl for all)\n")
		}
	})
}
