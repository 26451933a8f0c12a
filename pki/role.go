package pki

import (
	"errors"
	"fmt"
	"math/big"
	"net"
	"strings"
)

// Role is what a party is allowed to be in the federation. It is carried in
// the certificate subject's OU, so it is decided by the CA when it signs and
// cannot be claimed by a request.
type Role string

// The roles a certificate can carry.
const (
	// RoleDirector is the long-lived coordinator; its certificate is also
	// presented by the aggregators it starts, so it is both server and client.
	RoleDirector Role = "director"
	// RoleEnvoy is a data site's agent; its collaborators use the same
	// certificate, so collaborator name = envoy name = CN.
	RoleEnvoy Role = "envoy"
	// RoleResearcher submits experiments and sees only its own.
	RoleResearcher Role = "researcher"
	// RoleAdmin operates the federation and sees every experiment.
	RoleAdmin Role = "admin"

	// AnyRole is not a certificate role but a marker for Rules: a method
	// whose rule lists AnyRole is open to every authenticated party (for
	// example grpc.health.v1). The caller still needs a valid, unrevoked
	// certificate from the federation.
	AnyRole Role = "*"
)

// Roles lists the roles a certificate can carry, in a stable order for help
// texts and error messages.
func Roles() []Role {
	return []Role{RoleDirector, RoleEnvoy, RoleResearcher, RoleAdmin}
}

// Valid reports whether r is one of the certificate roles (AnyRole is not).
func (r Role) Valid() bool {
	switch r {
	case RoleDirector, RoleEnvoy, RoleResearcher, RoleAdmin:
		return true
	}
	return false
}

// String returns the role as written in the certificate's OU.
func (r Role) String() string { return string(r) }

// ParseRole turns a user-supplied role into a Role, naming the valid choices
// when it is not one.
func ParseRole(s string) (Role, error) {
	r := Role(strings.TrimSpace(s))
	if !r.Valid() {
		return "", fmt.Errorf("role %q is not a certificate role: use one of %s", s, roleList(Roles()))
	}
	return r, nil
}

func roleList(roles []Role) string {
	names := make([]string, len(roles))
	for i, r := range roles {
		names[i] = string(r)
	}
	return strings.Join(names, ", ")
}

// MaxNameLen bounds party names: they become file names, CNs and log fields.
const MaxNameLen = 64

// ValidateName checks a party name (a certificate CN): 1 to 64 characters of
// letters, digits, '.', '_' and '-', not starting with '.' or '-'. The rule
// keeps names safe as file names (no separators, no "..", no hidden files, no
// option-like names) and unambiguous in logs.
func ValidateName(name string) error {
	if name == "" {
		return errors.New("name is empty: use 1-64 characters of letters, digits, '.', '_' and '-'")
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("name %q is %d characters long: the limit is %d", name, len(name), MaxNameLen)
	}
	if name[0] == '.' || name[0] == '-' {
		return fmt.Errorf("name %q starts with %q: names may not start with '.' or '-'", name, name[0])
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return fmt.Errorf("name %q contains %q at byte %d: use only letters, digits, '.', '_' and '-'", name, c, i)
		}
	}
	return nil
}

// ValidateHost checks a subject alternative name for a director certificate:
// an IP address or a DNS name (no wildcards, no e-mail addresses or URIs),
// because those are the only forms clients check when they dial.
func ValidateHost(host string) error {
	if net.ParseIP(host) != nil {
		return nil
	}
	if host == "" {
		return errors.New("host is empty: use a DNS name or an IP address")
	}
	if len(host) > 253 {
		return fmt.Errorf("host %q is longer than 253 characters", host)
	}
	for _, label := range strings.Split(strings.TrimSuffix(host, "."), ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("host %q has an empty or over-long label: use a DNS name or an IP address", host)
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("host %q has a label that starts or ends with '-'", host)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return fmt.Errorf("host %q contains %q: a DNS name has letters, digits, '-' and dots (no wildcards)", host, c)
			}
		}
	}
	return nil
}

// FormatSerial writes a certificate serial number the way openssl prints it
// (upper-case hex without separators), so serials can be compared across
// `fx pki show`, `openssl x509 -serial` and the CRL.
func FormatSerial(serial *big.Int) string {
	if serial == nil {
		return ""
	}
	return fmt.Sprintf("%X", serial)
}

// ParseSerial reads a serial number in hex, as FormatSerial or openssl print
// it; an optional "0x" prefix and ':' separators are accepted.
func ParseSerial(s string) (*big.Int, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimPrefix(strings.TrimPrefix(t, "0x"), "0X")
	t = strings.ReplaceAll(t, ":", "")
	if t == "" {
		return nil, fmt.Errorf("serial %q is empty: give it in hex as `fx pki show` prints it", s)
	}
	n, ok := new(big.Int).SetString(t, 16)
	if !ok || n.Sign() < 0 {
		return nil, fmt.Errorf("serial %q is not a hex number: give it as `fx pki show` prints it", s)
	}
	return n, nil
}
