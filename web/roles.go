package web

import (
	"net/http"
	"strings"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/auth"
)

// routeRoles is the role each /api/v1 route needs, by method and chi
// pattern (below /api/v1). A route missing here is refused at runtime
// (403, logged as an error) and fails TestEveryRouteDeclaresARole, which
// also checks that openapi.json states the same role (x-fleetd-role). Add
// one line per route; keep them sorted by path.
//
// Viewers read; reading users, keys, webhooks (their URLs are often
// secrets) and the audit log is for admins. Operators run the fleet:
// devices, commands, configuration, firmware uploads and deletion,
// campaigns, fixes. Admins set policy (compatibility rules, verdict
// decisions) and manage users, keys and webhooks.
var routeRoles = map[string]auth.Role{
	"GET /audit":          auth.Admin,
	"GET /campaigns":      auth.Viewer,
	"POST /campaigns":     auth.Operator,
	"GET /campaigns/{id}": auth.Viewer,
	"POST /campaigns/{id}/{action:start|pause|resume|abort|rollback}": auth.Operator,
	"GET /campaigns/{id}/devices":                                     auth.Viewer,
	"GET /campaigns/{id}/history":                                     auth.Viewer,
	"GET /commands":                                                   auth.Viewer,
	"POST /commands":                                                  auth.Operator,
	"GET /commands/{id}":                                              auth.Viewer,
	"POST /commands/{id}/cancel":                                      auth.Operator,
	"GET /commands/{id}/devices":                                      auth.Viewer,
	"GET /compat/rules":                                               auth.Viewer,
	"PUT /compat/rules":                                               auth.Admin,
	"GET /compat/verdicts":                                            auth.Viewer,
	"PUT /compat/verdicts":                                            auth.Admin,
	"GET /config/layers":                                              auth.Viewer,
	"GET /config/layers/{scope}":                                      auth.Viewer,
	"PUT /config/layers/{scope}":                                      auth.Operator,
	"PATCH /config/layers/{scope}":                                    auth.Operator,
	"DELETE /config/layers/{scope}":                                   auth.Operator,
	"GET /devices":                                                    auth.Viewer,
	"POST /devices":                                                   auth.Operator,
	"GET /devices/{id}":                                               auth.Viewer,
	"PATCH /devices/{id}":                                             auth.Operator,
	"DELETE /devices/{id}":                                            auth.Operator,
	"GET /devices/{id}/commands":                                      auth.Viewer,
	"POST /devices/{id}/commands":                                     auth.Operator,
	"GET /devices/{id}/commands/{cid}":                                auth.Viewer,
	"GET /devices/{id}/config":                                        auth.Viewer,
	"PUT /devices/{id}/config":                                        auth.Operator,
	"PATCH /devices/{id}/config":                                      auth.Operator,
	"GET /devices/{id}/diagnosis":                                     auth.Viewer,
	"GET /devices/{id}/events":                                        auth.Viewer,
	"GET /devices/{id}/telemetry":                                     auth.Viewer,
	"POST /devices/{id}/token":                                        auth.Operator,
	"GET /firmware":                                                   auth.Viewer,
	"POST /firmware":                                                  auth.Operator,
	"GET /firmware/signing-key":                                       auth.Viewer,
	"GET /firmware/{id}":                                              auth.Viewer,
	"DELETE /firmware/{id}":                                           auth.Operator,
	"POST /fixes":                                                     auth.Operator,
	"GET /fleet/health":                                               auth.Viewer,
	"GET /fleet/history":                                              auth.Viewer,
	"GET /fleet/links":                                                auth.Viewer,
	"GET /fleet/telemetry":                                            auth.Viewer,
	"GET /keys":                                                       auth.Admin,
	"POST /keys":                                                      auth.Admin,
	"DELETE /keys/{id}":                                               auth.Admin,
	"GET /me":                                                         auth.Viewer,
	"GET /server":                                                     auth.Viewer,
	"DELETE /session":                                                 auth.Viewer,
	"GET /stream":                                                     auth.Viewer,
	"GET /users":                                                      auth.Admin,
	"POST /users":                                                     auth.Admin,
	"GET /users/{id}":                                                 auth.Admin,
	"PATCH /users/{id}":                                               auth.Admin,
	"DELETE /users/{id}":                                              auth.Admin,
	"GET /webhooks":                                                   auth.Admin,
	"POST /webhooks":                                                  auth.Admin,
	"GET /webhooks/events":                                            auth.Viewer,
	"GET /webhooks/{id}":                                              auth.Admin,
	"PATCH /webhooks/{id}":                                            auth.Admin,
	"DELETE /webhooks/{id}":                                           auth.Admin,
	"GET /webhooks/{id}/deliveries":                                   auth.Admin,
	"POST /webhooks/{id}/test":                                        auth.Admin,
}

// publicRoutes do their own authorisation (a signed download URL, or none
// for what holds no secret) or none at all (signing in). They are not in
// routeRoles; TestEveryRouteDeclaresARole refuses any other route outside
// it.
var publicRoutes = map[string]bool{
	"GET /firmware/{id}/download":  true,
	"HEAD /firmware/{id}/download": true,
	"GET /openapi.json":            true,
	"POST /session":                true,
}

// routeKey is a request's method and route pattern below /api/v1, the key
// of routeRoles.
func routeKey(r *http.Request) string {
	pattern := ""
	if rc := chi.RouteContext(r.Context()); rc != nil {
		pattern = rc.RoutePattern()
	}
	return r.Method + " " + strings.TrimSuffix(strings.TrimPrefix(pattern, "/api/v1"), "/")
}

// roleFor returns the role a request's route needs; ok is false for a
// route that declares none (refused).
func roleFor(r *http.Request) (auth.Role, bool) {
	key := routeKey(r)
	if strings.HasPrefix(key, http.MethodHead+" ") {
		key = http.MethodGet + key[len(http.MethodHead):]
	}
	role, ok := routeRoles[key]
	return role, ok
}
