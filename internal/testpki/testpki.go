// Package testpki makes a real federation CA for tests: certificates on
// disk, keyrings that reload them, and the server and client options that
// services and their callers use, exactly as in production.
package testpki

import (
	"path/filepath"
	"sync"
	"testing"

	"google.golang.org/grpc"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// CA is a test federation's certificate authority.
type CA struct {
	t   testing.TB
	CA  *pki.CA
	Dir string

	mu     sync.Mutex
	issued map[string]pki.Files // by role/name: a party has one certificate
}

// New makes a CA in a temporary directory.
func New(t testing.TB) *CA {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), pki.InitOptions{})
	if err != nil {
		t.Fatalf("testpki: init CA: %v", err)
	}
	return &CA{t: t, CA: ca, Dir: dir, issued: map[string]pki.Files{}}
}

// Files issues a certificate for a party, once, and writes it under the
// CA's directory; director certificates are valid for localhost, 127.0.0.1
// and ::1. Asking again for the same party returns the same files.
func (c *CA) Files(role pki.Role, name string) pki.Files {
	c.t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	key := string(role) + "/" + name
	if f, ok := c.issued[key]; ok {
		return f
	}
	req := pki.IssueRequest{Role: role, Name: name}
	if role == pki.RoleDirector {
		req.Hosts = []string{"localhost", "127.0.0.1", "::1"}
	}
	iss, err := c.CA.Issue(req)
	if err != nil {
		c.t.Fatalf("testpki: issue %s %s: %v", role, name, err)
	}
	files, err := iss.WriteFiles(filepath.Join(c.Dir, string(role), name))
	if err != nil {
		c.t.Fatalf("testpki: write %s %s: %v", role, name, err)
	}
	files.CRL = c.CA.CRLPath()
	c.issued[key] = files
	return files
}

// Keyring issues a certificate and loads it; the keyring looks at its files
// on every use so tests see reloads at once.
func (c *CA) Keyring(role pki.Role, name string) *pki.Keyring {
	c.t.Helper()
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: c.Files(role, name), CheckInterval: -1})
	if err != nil {
		c.t.Fatalf("testpki: keyring %s %s: %v", role, name, err)
	}
	return k
}

// Rules converts a service's role table from the protocol into pki's.
func Rules(table map[string][]fxv1.Role) pki.Rules {
	return pki.RulesFromProto(table)
}

// ServerOptions secure a server with the keyring and the role table.
func ServerOptions(k *pki.Keyring, table map[string][]fxv1.Role) []grpc.ServerOption {
	return pki.ServerOptions(k, Rules(table))
}

// DialOptions connect as the keyring's party to a server whose certificate
// names serverName.
func DialOptions(k *pki.Keyring, serverName string) []grpc.DialOption {
	return pki.DialOptions(k, serverName)
}
