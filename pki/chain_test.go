package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
)

// rootSignedPair is a certificate for role and name signed by the federation
// root itself, as whoever holds root.key could make one without the signing
// CA. Hosts make it a server certificate.
func rootSignedPair(t *testing.T, ca *CA, role Role, name string, hosts ...string) tls.Certificate {
	t.Helper()
	rootKey, err := readPrivateKey(filepath.Join(ca.Dir(), RootKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name, Organization: ca.Root().Subject.Organization, OrganizationalUnit: []string{string(role)}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	if len(hosts) > 0 {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Root(), key.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// A client certificate signed by the root itself, not by the signing CA, is
// refused in the handshake: the docs promise leaf → signing CA → root, and
// only the signing CA's CRL can revoke a leaf.
func TestServerRefusesLeafSignedByRoot(t *testing.T) {
	f := newFederation(t, true)
	ctx := testContext(t)
	roots := x509.NewCertPool()
	roots.AddCert(f.ca.Root())
	forged := rootSignedPair(t, f.ca, RoleEnvoy, "site-1")

	err := check(ctx, dialRaw(t, f.server.addr, roots, &forged), "site-1")
	t.Logf("refused with: %v", err)
	wantStatus(t, err, codes.Unauthenticated, "refused this certificate")
	if n := f.server.health.calls.Load(); n != 0 {
		t.Fatalf("the handler was reached %d times", n)
	}

	// The same party with a certificate of the signing CA is served.
	envoy, _ := issueFiles(t, f.ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	if err := check(ctx, dial(t, f.server.addr, envoy), "site-1"); err != nil {
		t.Fatalf("Check with a certificate of the signing CA: %v", err)
	}
}

// A server certificate signed by the root itself is refused by fx clients.
func TestClientRefusesServerSignedByRoot(t *testing.T) {
	ca := newTestCA(t)
	envoy, _ := issueFiles(t, ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	k, err := NewKeyring(KeyringConfig{Files: envoy, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	forged := rootSignedPair(t, ca, RoleDirector, "director.test", "localhost", "127.0.0.1")
	lis, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{forged},
		ClientAuth:   tls.RequireAnyClientCert,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()

	dialer := &net.Dialer{Timeout: 10 * time.Second}
	conn, err := tls.DialWithDialer(dialer, "tcp", lis.Addr().String(), k.ClientConfig("localhost"))
	if err == nil {
		conn.Close()
		t.Fatal("an fx client accepted a server certificate signed by the root itself")
	}
	if !strings.Contains(err.Error(), "signed by the federation root") {
		t.Fatalf("refused with %v, want the reason: signed by the federation root", err)
	}
}

// A party does not start with a certificate signed by the root itself: its
// peers would refuse it.
func TestKeyringRefusesOwnLeafSignedByRoot(t *testing.T) {
	ca := newTestCA(t)
	forged := rootSignedPair(t, ca, RoleEnvoy, "site-1")
	dir := t.TempDir()
	files := PartyFiles(dir, "site-1")
	keyDER, err := x509.MarshalPKCS8PrivateKey(forged.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	for path, data := range map[string][]byte{
		files.Cert: append(encodeCertificates(forged.Leaf), encodeCertificates(ca.Root())...),
		files.Key:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		files.CA:   ca.RootPEM(),
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := NewKeyring(KeyringConfig{Files: files}); err == nil || !strings.Contains(err.Error(), "signed by the federation root") {
		t.Fatalf("NewKeyring with a certificate signed by the root: %v", err)
	}
}
