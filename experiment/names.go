package experiment

import (
	"errors"
	"fmt"
	"strings"
)

// MaxNameLen is the longest experiment, envoy or owner name fx accepts. Names
// become directory names and certificate CNs, so they are kept short.
const MaxNameLen = 64

// ErrInvalidName is matched (errors.Is) by every error ValidateName returns, so
// a service can answer InvalidArgument without parsing messages.
var ErrInvalidName = errors.New("invalid name")

// NameError says which name was refused and why.
type NameError struct {
	Kind   string // what the name names: "experiment", "envoy", "owner", ...
	Name   string
	Reason string
}

func (e *NameError) Error() string {
	return fmt.Sprintf("%s name %q: %s", e.Kind, e.Name, e.Reason)
}

// Unwrap makes errors.Is(err, ErrInvalidName) true.
func (e *NameError) Unwrap() error { return ErrInvalidName }

// ValidateName checks the name of an experiment, envoy or owner (kind says
// which, for the message). Names end up in file-system paths on the director
// and the envoys and in certificate subjects, so only a conservative set is
// allowed: 1 to 64 characters of letters, digits, '.', '_' and '-', not
// starting with '.' or '-' (no hidden files, nothing a command line reads as a
// flag), and never "..". A name that passes is safe to use as one path
// element on any operating system fx runs on.
func ValidateName(kind, name string) error {
	refuse := func(reason string) error { return &NameError{Kind: kind, Name: name, Reason: reason} }
	if name == "" {
		return refuse("must not be empty: use 1 to 64 letters, digits, '.', '_' and '-'")
	}
	if len(name) > MaxNameLen {
		return refuse(fmt.Sprintf("is %d characters long: at most %d are allowed", len(name), MaxNameLen))
	}
	for i := 0; i < len(name); i++ {
		if !nameByte(name[i]) {
			return refuse("use letters, digits, '.', '_' and '-' only")
		}
	}
	if name[0] == '.' || name[0] == '-' {
		return refuse("must not start with '.' or '-'")
	}
	if strings.Contains(name, "..") {
		return refuse(`must not contain ".."`)
	}
	return nil
}

func nameByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-'
}
