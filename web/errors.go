package web

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"os"
)

// errorBody is the JSON shape of every error response:
// {"error":{"code":"...","message":"...","field":"..."}}.
type errorBody struct {
	Error apiError `json:"error"`
}

type apiError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

// FieldError is implemented by validation errors that name the offending
// request field; the field is echoed in the JSON error so that a client can
// point at it.
type FieldError interface {
	error
	FieldName() string
}

// statusMapping maps domain sentinels to HTTP statuses in one table. Domain
// packages register their sentinels with RegisterError at init.
var statusMapping []struct {
	target error
	status int
	code   string
}

// RegisterError maps a sentinel error (matched with errors.Is) to a status
// and a stable machine-readable code.
func RegisterError(target error, status int, code string) {
	statusMapping = append(statusMapping, struct {
		target error
		status int
		code   string
	}{target, status, code})
}

// badRequest is a validation error raised by the web layer itself (malformed
// JSON, bad query parameter).
type badRequest struct{ field, msg string }

func (e *badRequest) Error() string     { return e.msg }
func (e *badRequest) FieldName() string { return e.field }

// BadRequest returns an error that renders as a 400 naming field.
func BadRequest(field, msg string) error { return &badRequest{field: field, msg: msg} }

// writeError renders err as JSON. Only 5xx errors are logged: 4xx are the
// client's business and already in the access log.
func writeError(w http.ResponseWriter, r *http.Request, logger *slog.Logger, err error) {
	status, body := http.StatusInternalServerError, apiError{Code: "internal", Message: "internal error"}
	var fe FieldError
	switch {
	case errors.As(err, &fe):
		status, body = http.StatusBadRequest, apiError{Code: "invalid", Message: err.Error(), Field: fe.FieldName()}
	default:
		for _, m := range statusMapping {
			if errors.Is(err, m.target) {
				status, body = m.status, apiError{Code: m.code, Message: err.Error()}
				break
			}
		}
	}
	if status >= 500 {
		logger.ErrorContext(r.Context(), "request failed", "err", err, "request_id", RequestID(r.Context()), "path", r.URL.Path)
	}
	writeJSON(w, status, errorBody{body})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

// decodeJSON reads a JSON request body into v, refusing unknown fields and
// trailing data, with errors that name the field when json can tell.
func decodeJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var typeErr *json.UnmarshalTypeError
		var maxErr *http.MaxBytesError
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			return bodyTimeout(err)
		case errors.As(err, &typeErr):
			return BadRequest(typeErr.Field, "field "+typeErr.Field+" must be "+typeErr.Type.String())
		case errors.As(err, &maxErr):
			return BadRequest("body", "request body larger than 1 MiB")
		case err.Error() == "EOF":
			return BadRequest("body", "request body is empty")
		default:
			if f, ok := unknownField(err); ok {
				return BadRequest(f, "unknown field "+f)
			}
			return BadRequest("body", "malformed JSON: "+err.Error())
		}
	}
	if dec.More() {
		return BadRequest("body", "request body holds more than one JSON value")
	}
	return nil
}

// unknownField extracts the name from encoding/json's "json: unknown field
// \"x\"" error, which has no typed form.
func unknownField(err error) (string, bool) {
	const prefix = `json: unknown field "`
	msg := err.Error()
	if len(msg) > len(prefix)+1 && msg[:len(prefix)] == prefix {
		return msg[len(prefix) : len(msg)-1], true
	}
	return "", false
}
