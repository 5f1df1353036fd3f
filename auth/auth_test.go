package auth

import (
	"strings"
	"testing"
)

func TestRoleAllows(t *testing.T) {
	tests := []struct {
		have, need Role
		want       bool
	}{
		{Viewer, Viewer, true},
		{Viewer, Operator, false},
		{Operator, Viewer, true},
		{Operator, Admin, false},
		{Admin, Operator, true},
		{Role("root"), Viewer, false},
		{Admin, Role(""), false},
	}
	for _, tt := range tests {
		if got := tt.have.Allows(tt.need); got != tt.want {
			t.Errorf("%q.Allows(%q) = %v, want %v", tt.have, tt.need, got, tt.want)
		}
	}
	if Lower(Admin, Operator) != Operator || Lower(Viewer, Admin) != Viewer {
		t.Error("Lower does not pick the lower role")
	}
}

func TestPasswordHash(t *testing.T) {
	p := Params{Memory: 64, Time: 1, Threads: 1}
	h := HashPassword("correct horse battery", p)
	if !strings.HasPrefix(h, "$argon2id$v=19$m=64,t=1,p=1$") {
		t.Fatalf("hash %q is not a PHC string with its parameters", h)
	}
	if h == HashPassword("correct horse battery", p) {
		t.Fatal("two hashes of one password are equal: no salt")
	}
	for _, tt := range []struct {
		name, pw, hash string
		ok, err        bool
	}{
		{"right", "correct horse battery", h, true, false},
		{"wrong", "correct horse batterY", h, false, false},
		{"too long", strings.Repeat("a", MaxPassword+1), h, false, false},
		{"not phc", "x", "$2a$10$abc", false, true},
		{"zero cost", "x", "$argon2id$v=19$m=0,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", false, true},
	} {
		ok, err := VerifyPassword(tt.pw, tt.hash)
		if ok != tt.ok || (err != nil) != tt.err {
			t.Errorf("%s: VerifyPassword = %v, %v; want %v, error %v", tt.name, ok, err, tt.ok, tt.err)
		}
	}
	for _, tt := range []struct {
		pw string
		ok bool
	}{{"short", false}, {strings.Repeat("p", MinPassword), true}, {strings.Repeat("p", MaxPassword+1), false}, {"\xff\xfe invalid utf8!", false}} {
		if err := CheckPassword(tt.pw); (err == nil) != tt.ok {
			t.Errorf("CheckPassword(%d bytes) = %v, want ok %v", len(tt.pw), err, tt.ok)
		}
	}
}

func TestKeyShape(t *testing.T) {
	if !LooksLikeKey("fk_0123456789abcdef" + strings.Repeat("A", 43)) {
		t.Error("a key-shaped token is not recognised")
	}
	for _, tok := range []string{"", "fk_short", "xx_0123456789abcdef" + strings.Repeat("A", 43)} {
		if LooksLikeKey(tok) {
			t.Errorf("%q looks like a key", tok)
		}
	}
}
