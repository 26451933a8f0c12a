package pki

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// federation is a CA with a director serving the health service and some
// parties' files.
type federation struct {
	ca       *CA
	director Files
	server   *testServer
}

func newFederation(t *testing.T, withCRL bool) *federation {
	t.Helper()
	ca := newTestCA(t)
	director, _ := issueFiles(t, ca, IssueRequest{Role: RoleDirector, Name: "director.test", Hosts: []string{"localhost", "127.0.0.1"}})
	if withCRL {
		director.CRL = ca.CRLPath()
	}
	return &federation{ca: ca, director: director, server: startServer(t, director, testRules())}
}

func wantStatus(t *testing.T, err error, code codes.Code, wantInMessage ...string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code {
		t.Fatalf("status = %v %q, want %v", st.Code(), st.Message(), code)
	}
	for _, w := range wantInMessage {
		if !strings.Contains(st.Message(), w) {
			t.Fatalf("status message %q does not contain %q", st.Message(), w)
		}
	}
}

func TestRightRoleIsAccepted(t *testing.T) {
	f := newFederation(t, true)
	ctx := testContext(t)
	envoy, iss := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	conn := dial(t, f.server.addr, envoy)
	if err := check(ctx, conn, "site-1"); err != nil {
		t.Fatalf("Check as envoy site-1: %v", err)
	}
	got := f.server.health.lastIdentity()
	want := Identity{Name: "site-1", Role: RoleEnvoy, Serial: FormatSerial(iss.Cert.SerialNumber), NotAfter: iss.Cert.NotAfter}
	if got != want {
		t.Fatalf("handler saw identity %+v, want %+v", got, want)
	}

	// A stream open to AnyRole admits a researcher, with its identity.
	researcher, _ := issueFiles(t, f.ca, IssueRequest{Role: RoleResearcher, Name: "ada"})
	rconn := dial(t, f.server.addr, researcher)
	stream, err := healthpb.NewHealthClient(rconn).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatalf("Watch Recv as researcher: %v", err)
	}
	if id := f.server.health.lastIdentity(); id.Name != "ada" || id.Role != RoleResearcher {
		t.Fatalf("stream handler saw %+v, want researcher ada", id)
	}
}

func TestRefusedCallsChangeNothing(t *testing.T) {
	f := newFederation(t, true)
	ctx := testContext(t)
	roots := x509.NewCertPool()
	roots.AddCert(f.ca.Root())

	envoy, _ := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	researcher, _ := issueFiles(t, f.ca, IssueRequest{Role: RoleResearcher, Name: "ada"})
	other := newTestCA(t)
	stranger, _ := issueFiles(t, other, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	strangerPair, err := tls.LoadX509KeyPair(stranger.Cert, stranger.Key)
	if err != nil {
		t.Fatal(err)
	}
	expired, err := f.ca.Issue(IssueRequest{Role: RoleEnvoy, Name: "site-old", NotBefore: time.Now().Add(-2 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})
	if err != nil {
		t.Fatalf("issuing an expired certificate: %v", err)
	}
	expiredPair, err := tls.X509KeyPair(expired.ChainPEM, expired.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		call   func() error
		code   codes.Code
		substr []string
	}{
		{"no client certificate", func() error {
			return check(ctx, dialRaw(t, f.server.addr, roots, nil), "site-1")
		}, codes.Unauthenticated, []string{"certificate required"}},
		{"certificate from another CA", func() error {
			return check(ctx, dialRaw(t, f.server.addr, roots, &strangerPair), "site-1")
		}, codes.Unauthenticated, []string{"unknown certificate authority"}},
		{"expired certificate", func() error {
			return check(ctx, dialRaw(t, f.server.addr, roots, &expiredPair), "site-old")
		}, codes.Unauthenticated, []string{"expired"}},
		{"wrong role", func() error {
			return check(ctx, dial(t, f.server.addr, researcher), "ada")
		}, codes.PermissionDenied, []string{"certificate role researcher may not call Check (allowed: envoy, admin)"}},
		{"method in no rule", func() error {
			_, err := healthpb.NewHealthClient(dial(t, f.server.addr, envoy)).List(ctx, &healthpb.HealthListRequest{})
			return err
		}, codes.PermissionDenied, []string{"method /grpc.health.v1.Health/List is not open to any role"}},
		{"request names another envoy", func() error {
			return check(ctx, dial(t, f.server.addr, envoy), "site-2")
		}, codes.PermissionDenied, []string{"request names envoy site-2 but the certificate is for site-1"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := f.server.health.calls.Load()
			err := tc.call()
			t.Logf("refused with: %v", err)
			wantStatus(t, err, tc.code, tc.substr...)
			if after := f.server.health.calls.Load(); after != before {
				t.Fatalf("a refused call reached the handler (%d calls before, %d after)", before, after)
			}
		})
	}
}

func TestRevokedWhileServing(t *testing.T) {
	f := newFederation(t, true)
	ctx := testContext(t)
	envoy, iss := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	conn := dial(t, f.server.addr, envoy)
	if err := check(ctx, conn, "site-1"); err != nil {
		t.Fatalf("Check before revocation: %v", err)
	}
	calls := f.server.health.calls.Load()

	if _, err := f.ca.Revoke(iss.Cert.SerialNumber); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	// The open connection was verified before the revocation; the
	// interceptor refuses its next call from the reloaded CRL.
	wantStatus(t, check(ctx, conn, "site-1"), codes.Unauthenticated, "revoked", "site-1")
	// A new connection is refused in the handshake.
	wantStatus(t, check(ctx, dial(t, f.server.addr, envoy), "site-1"), codes.Unauthenticated, "bad certificate")
	if got := f.server.health.calls.Load(); got != calls {
		t.Fatalf("revoked calls reached the handler: %d calls, want %d", got, calls)
	}

	// Others are unaffected.
	admin, _ := issueFiles(t, f.ca, IssueRequest{Role: RoleAdmin, Name: "root-admin"})
	if err := check(ctx, dial(t, f.server.addr, admin), "root-admin"); err != nil {
		t.Fatalf("Check as admin after revoking site-1: %v", err)
	}
}

func TestExpiresWhileConnected(t *testing.T) {
	f := newFederation(t, false)
	ctx := testContext(t)
	var clock atomic.Pointer[time.Time]
	now := time.Now()
	clock.Store(&now)
	f.server.authz.now = func() time.Time { return *clock.Load() }

	envoy, iss := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1", TTL: time.Hour})
	conn := dial(t, f.server.addr, envoy)
	if err := check(ctx, conn, "site-1"); err != nil {
		t.Fatalf("Check while valid: %v", err)
	}
	later := iss.Cert.NotAfter.Add(time.Second)
	clock.Store(&later)
	wantStatus(t, check(ctx, conn, "site-1"), codes.Unauthenticated, "expired at", "site-1")
}

func TestServerCertificateReloads(t *testing.T) {
	f := newFederation(t, true)
	ctx := testContext(t)
	envoy, _ := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	serial := func() string {
		t.Helper()
		var p peer.Peer
		if err := check(ctx, dial(t, f.server.addr, envoy), "site-1", grpc.Peer(&p)); err != nil {
			t.Fatalf("Check: %v", err)
		}
		return FormatSerial(p.AuthInfo.(credentials.TLSInfo).State.PeerCertificates[0].SerialNumber)
	}
	first := serial()

	renewed, iss := issueFiles(t, f.ca, IssueRequest{Role: RoleDirector, Name: "director.test", Hosts: []string{"localhost", "127.0.0.1"}})
	// Replace key and certificate the way an operator's tool would: each
	// file atomically, one after the other.
	if err := os.Rename(renewed.Key, f.director.Key); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(renewed.Cert, f.director.Cert); err != nil {
		t.Fatal(err)
	}
	second := serial()
	if second == first || second != FormatSerial(iss.Cert.SerialNumber) {
		t.Fatalf("after replacing the files the server presented serial %s, want the new %s (old %s)", second, FormatSerial(iss.Cert.SerialNumber), first)
	}
	if got := f.server.keyring.Identity().Serial; got != second {
		t.Fatalf("server keyring identity serial = %s, want %s", got, second)
	}
}

func TestClientChecksServerName(t *testing.T) {
	f := newFederation(t, false)
	ctx := testContext(t)
	envoy, _ := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	k, err := NewKeyring(KeyringConfig{Files: envoy})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := NewClient(f.server.addr, k, "evil.example")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	err = check(ctx, conn, "site-1")
	if st, _ := status.FromError(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "evil.example") {
		t.Fatalf("dialing with a server name the director's certificate lacks: %v, want Unavailable naming evil.example", err)
	}
	// By name, as listed in the director's SANs.
	conn2, err := NewClient(f.server.addr, k, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	if err := check(ctx, conn2, "site-1"); err != nil {
		t.Fatalf("dialing as localhost: %v", err)
	}
}

// Any gRPC client that is not built with fx's dial options (grpcio, grpc-go
// with plain TLS credentials) sees a refusal in the TLS handshake as
// Unavailable: gRPC reports every failure to set up a connection so, and
// the server cannot send a status before the handshake has succeeded. fx's
// clients turn the TLS alert into Unauthenticated (TestRefusedCallsChangeNothing);
// docs/protocol.md and docs/security.md say both. A plain client also may
// not wait for the server's verdict, so its message can be vaguer.
func TestPlainClientSeesHandshakeRefusalAsUnavailable(t *testing.T) {
	f := newFederation(t, true)
	ctx := testContext(t)
	roots := x509.NewCertPool()
	roots.AddCert(f.ca.Root())
	pair := func(files Files) []tls.Certificate {
		t.Helper()
		p, err := tls.LoadX509KeyPair(files.Cert, files.Key)
		if err != nil {
			t.Fatal(err)
		}
		return []tls.Certificate{p}
	}
	revoked, iss := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	if _, err := f.ca.Revoke(iss.Cert.SerialNumber); err != nil {
		t.Fatal(err)
	}
	stranger, _ := issueFiles(t, newTestCA(t), IssueRequest{Role: RoleEnvoy, Name: "site-1"})

	for _, tc := range []struct {
		name  string
		certs []tls.Certificate
	}{
		{"no client certificate", nil},
		{"revoked certificate", pair(revoked)},
		{"certificate from another CA", pair(stranger)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			creds := credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots, Certificates: tc.certs})
			conn, err := grpc.NewClient(f.server.addr, grpc.WithTransportCredentials(creds))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			err = check(ctx, conn, "site-1")
			t.Logf("refused with: %v", err)
			if code := status.Code(err); code != codes.Unavailable {
				t.Fatalf("a plain gRPC client refused in the handshake got %v, want Unavailable (or update docs/protocol.md and docs/security.md)", code)
			}
			if n := f.server.health.calls.Load(); n != 0 {
				t.Fatalf("handler reached %d times", n)
			}
		})
	}
}

// Putting an older CRL in place of the current one (a restored backup, a
// stale copy, an attacker who can write the file) must not make a revoked
// certificate valid again: the CRL with the higher number stays in force,
// and the refusal is logged as an error.
func TestOlderCRLDoesNotUnrevoke(t *testing.T) {
	ca := newTestCA(t)
	director, _ := issueFiles(t, ca, IssueRequest{Role: RoleDirector, Name: "director.test", Hosts: []string{"localhost", "127.0.0.1"}})
	director.CRL = filepath.Join(t.TempDir(), "crl.pem")
	older, err := os.ReadFile(ca.CRLPath())
	if err != nil {
		t.Fatal(err)
	}
	install := func(crl []byte) {
		t.Helper()
		if err := writeFileAtomic(director.CRL, crl, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	install(older)
	srv := startServer(t, director, testRules())
	var logged lockedBuffer
	watcher, err := NewKeyring(KeyringConfig{Files: director, CheckInterval: -1, Logger: hclog.New(&hclog.LoggerOptions{Output: &logged})})
	if err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)
	envoy, iss := issueFiles(t, ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	if err := check(ctx, dial(t, srv.addr, envoy), "site-1"); err != nil {
		t.Fatalf("Check before revocation: %v", err)
	}

	if _, err := ca.Revoke(iss.Cert.SerialNumber); err != nil {
		t.Fatal(err)
	}
	newer, err := os.ReadFile(ca.CRLPath())
	if err != nil {
		t.Fatal(err)
	}
	install(newer)
	wantStatus(t, check(ctx, dial(t, srv.addr, envoy), "site-1"), codes.Unauthenticated, "bad certificate")
	chain := []*x509.Certificate{iss.Cert, ca.Signing()}
	if _, revoked := watcher.Revocation(chain); !revoked {
		t.Fatal("the keyring did not load the newer CRL")
	}

	install(older)
	wantStatus(t, check(ctx, dial(t, srv.addr, envoy), "site-1"), codes.Unauthenticated, "bad certificate")
	if _, revoked := watcher.Revocation(chain); !revoked {
		t.Fatal("an older CRL un-revoked the certificate")
	}
	if err := srv.keyring.Reload(); err == nil || !strings.Contains(err.Error(), "older") {
		t.Fatalf("Reload with an older CRL: %v, want it refused as older", err)
	}
	if out := logged.String(); !strings.Contains(out, "[ERROR]") || !strings.Contains(out, "older") {
		t.Fatalf("the refused CRL was not logged as an error; log:\n%s", out)
	}

	// A newer CRL is taken again: the refusal was of that file, not of CRLs.
	admin, adminIss := issueFiles(t, ca, IssueRequest{Role: RoleAdmin, Name: "ops"})
	if _, err := ca.Revoke(adminIss.Cert.SerialNumber); err != nil {
		t.Fatal(err)
	}
	newest, err := os.ReadFile(ca.CRLPath())
	if err != nil {
		t.Fatal(err)
	}
	install(newest)
	if err := srv.keyring.Reload(); err != nil {
		t.Fatalf("Reload with a newer CRL: %v", err)
	}
	wantStatus(t, check(ctx, dial(t, srv.addr, admin), "ops"), codes.Unauthenticated, "bad certificate")
}

// lockedBuffer is a log destination that tests read while servers write.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Moving to a new CA starts its CRL numbers afresh: a CRL of another signing
// CA is not older, whatever its number.
func TestCRLOfNewCAIsTaken(t *testing.T) {
	oldCA, newCA := newTestCA(t), newTestCA(t)
	dir := t.TempDir()
	bundle := append(oldCA.RootPEM(), newCA.RootPEM()...)
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), bundle, 0o644); err != nil {
		t.Fatal(err)
	}
	_, files, err := oldCA.IssueTo(dir, IssueRequest{Role: RoleDirector, Name: "director.test"})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 { // the old CA's CRL is now number 4, the new one's 1
		if _, _, err := oldCA.WriteCRL(time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	files.CRL = filepath.Join(dir, "crl.pem")
	copyFile := func(from, to string) {
		t.Helper()
		data, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := writeFileAtomic(to, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(oldCA.CRLPath(), files.CRL)
	k, err := NewKeyring(KeyringConfig{Files: files, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}

	renewed, iss := issueFiles(t, newCA, IssueRequest{Role: RoleDirector, Name: "director.test"})
	copyFile(renewed.Key, files.Key)
	copyFile(renewed.Cert, files.Cert)
	copyFile(newCA.CRLPath(), files.CRL)
	if err := k.Reload(); err != nil {
		t.Fatalf("moving to the new CA's certificate and CRL: %v", err)
	}
	if got := k.Identity().Serial; got != FormatSerial(iss.Cert.SerialNumber) {
		t.Fatalf("the keyring holds serial %s, want the new CA's %s", got, FormatSerial(iss.Cert.SerialNumber))
	}
}
