package web

import (
	_ "embed"
	"net/http"

	"github.com/go-chi/chi/v5"
)

// openAPI describes /api/v1. TestOpenAPICoversEveryRoute keeps it true: a
// route added without documenting it fails the tests.
//
//go:embed openapi.json
var openAPI []byte

// MountOpenAPI serves the document at /api/v1/openapi.json, without a token
// (it holds no secret).
func (s *Server) MountOpenAPI() {
	s.mount(func(public, _ chi.Router) {
		public.Get("/openapi.json", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(openAPI)
		})
	})
}
