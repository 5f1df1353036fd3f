package web

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"time"
)

// console holds the web console: plain HTML, JavaScript and CSS, no build
// step. The console is a single page application under /ui/; it talks to
// the REST API with the admin token the operator types in, kept in the
// tab's sessionStorage.
//
//go:embed console
var consoleFS embed.FS

// consolePrefix is where the console lives. "/" serves it too, so that an
// operator who opens fleetd's address lands on it.
const consolePrefix = "/ui"

// consoleCSP keeps the console to its own origin: no inline script, no
// third-party resources, no framing (clickjacking of the admin console).
// Styles set from script through the CSSOM are not affected by style-src.
const consoleCSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// assetTypes are the content types of the console's files, set explicitly
// so that they do not depend on the host's mime tables.
var assetTypes = map[string]string{
	".html":  "text/html; charset=utf-8",
	".js":    "text/javascript; charset=utf-8",
	".css":   "text/css; charset=utf-8",
	".svg":   "image/svg+xml",
	".png":   "image/png",
	".ico":   "image/x-icon",
	".json":  "application/json",
	".txt":   "text/plain; charset=utf-8",
	".map":   "application/json",
	".woff2": "font/woff2",
}

type consoleAsset struct {
	data  []byte
	etag  string
	ctype string
}

// ConsoleHandler serves the web console. Mount it for GET on "/" and
// "/ui/*" (or on "/*"): files of the console are served by their path under
// /ui/ (e.g. /ui/app.js); any other path that does not name a file, such as
// the client-side route /ui/devices/gw-1, gets index.html, so that a
// bookmarked or reloaded page works. A missing asset (a path ending in a
// known file extension) and any path under /api/ get a JSON 404 instead.
// Every answer carries Cache-Control: no-cache (the browser revalidates with
// the ETag, so an upgraded fleetd never runs a stale console).
func ConsoleHandler() http.Handler {
	sub, err := fs.Sub(consoleFS, "console")
	if err != nil {
		panic(err) // the embed directive guarantees the directory
	}
	assets := map[string]consoleAsset{}
	err = fs.WalkDir(sub, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := fs.ReadFile(sub, p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(data)
		ctype, ok := assetTypes[path.Ext(p)]
		if !ok {
			ctype = http.DetectContentType(data)
		}
		assets["/"+p] = consoleAsset{data: data, etag: `"` + hex.EncodeToString(sum[:12]) + `"`, ctype: ctype}
		return nil
	})
	if err != nil {
		panic(err)
	}
	index, ok := assets["/index.html"]
	if !ok {
		panic("web: console/index.html is missing")
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			writeJSON(w, http.StatusMethodNotAllowed, errorBody{apiError{Code: "method_not_allowed", Message: r.Method + " is not allowed on " + r.URL.Path}})
			return
		}
		p := r.URL.Path
		if p == "/api" || strings.HasPrefix(p, "/api/") {
			writeJSON(w, http.StatusNotFound, errorBody{apiError{Code: "not_found", Message: "no such endpoint: " + p}})
			return
		}
		if p == consolePrefix {
			p = "/"
		} else if rest, ok := strings.CutPrefix(p, consolePrefix+"/"); ok {
			p = "/" + rest
		}
		p = path.Clean("/" + p)
		asset, found := assets[p]
		switch {
		case found && p != "/index.html":
		case p != "/" && isAssetPath(p):
			writeJSON(w, http.StatusNotFound, errorBody{apiError{Code: "not_found", Message: "no such console file: " + r.URL.Path}})
			return
		default:
			asset = index
		}
		h := w.Header()
		h.Set("Content-Type", asset.ctype)
		h.Set("Cache-Control", "no-cache")
		h.Set("ETag", asset.etag)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Frame-Options", "DENY")
		if asset.ctype == index.ctype {
			h.Set("Content-Security-Policy", consoleCSP)
		}
		// ServeContent answers If-None-Match with 304 and HEAD without a
		// body; the zero modification time leaves Last-Modified out.
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(asset.data))
	})
}

// isAssetPath reports whether p looks like a file rather than a client-side
// route: its last element ends in an extension the console could serve.
// Device ids may hold dots ("gw-1.2"), so only known extensions count.
func isAssetPath(p string) bool {
	_, ok := assetTypes[path.Ext(p)]
	return ok
}
