package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestInitCAMakesTwoLevels(t *testing.T) {
	ca := newTestCA(t)
	root, signing := ca.Root(), ca.Signing()

	if !root.IsCA || root.MaxPathLen != 1 {
		t.Errorf("root: IsCA=%v MaxPathLen=%d, want a CA with path length 1", root.IsCA, root.MaxPathLen)
	}
	if k, ok := root.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P384() {
		t.Errorf("root key is %T, want ECDSA P-384", root.PublicKey)
	}
	if life := root.NotAfter.Sub(root.NotBefore); life < 9*365*24*time.Hour {
		t.Errorf("root lives %s, want about ten years", life)
	}
	if !signing.IsCA || signing.MaxPathLen != 0 || !signing.MaxPathLenZero {
		t.Errorf("signing CA: IsCA=%v MaxPathLen=%d MaxPathLenZero=%v, want path length 0", signing.IsCA, signing.MaxPathLen, signing.MaxPathLenZero)
	}
	if err := signing.CheckSignatureFrom(root); err != nil {
		t.Errorf("signing CA not signed by the root: %v", err)
	}
	if signing.KeyUsage&x509.KeyUsageCertSign == 0 || signing.KeyUsage&x509.KeyUsageCRLSign == 0 {
		t.Errorf("signing CA key usage %v lacks cert sign or CRL sign", signing.KeyUsage)
	}
	for _, f := range []string{RootKeyFile, SigningKeyFile} {
		fi, err := os.Stat(filepath.Join(ca.Dir(), f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	for _, f := range []string{RootCertFile, SigningCertFile, CRLFile, RevokedFile} {
		if _, err := os.Stat(filepath.Join(ca.Dir(), f)); err != nil {
			t.Errorf("init did not write %s: %v", f, err)
		}
	}
}

func TestInitCARefusesExistingCA(t *testing.T) {
	ca := newTestCA(t)
	before, err := os.ReadFile(filepath.Join(ca.Dir(), RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	_, err = InitCA(ca.Dir(), InitOptions{})
	if !errors.Is(err, ErrCAExists) || !strings.Contains(err.Error(), "would stop being trusted") {
		t.Fatalf("second InitCA: %v, want ErrCAExists explaining why", err)
	}
	after, _ := os.ReadFile(filepath.Join(ca.Dir(), RootCertFile))
	if !bytes.Equal(before, after) {
		t.Fatal("the refused InitCA changed root.crt")
	}
	// A partial CA (say, only the root key survived) is refused too.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, RootKeyFile), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := InitCA(dir, InitOptions{}); !errors.Is(err, ErrCAExists) {
		t.Fatalf("InitCA over a lone root.key: %v, want ErrCAExists", err)
	}
}

func TestIssueUsagesPerRole(t *testing.T) {
	ca := newTestCA(t)
	dir, _ := issueFiles(t, ca, IssueRequest{Role: RoleDirector, Name: "director.example.org", Hosts: []string{"director.example.org", "10.0.0.7"}})
	director, err := readCertificates(dir.Cert)
	if err != nil {
		t.Fatal(err)
	}
	if len(director) != 2 || !bytes.Equal(director[1].Raw, ca.Signing().Raw) {
		t.Fatalf("director.crt holds %d certificates, want the leaf followed by the signing CA", len(director))
	}
	d := director[0]
	if !slices.Equal(d.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
		t.Errorf("director ext key usage = %v, want server and client auth", d.ExtKeyUsage)
	}
	if !slices.Equal(d.DNSNames, []string{"director.example.org"}) || len(d.IPAddresses) != 1 || !d.IPAddresses[0].Equal(net.ParseIP("10.0.0.7")) {
		t.Errorf("director SANs = %v %v", d.DNSNames, d.IPAddresses)
	}
	if d.IsCA {
		t.Error("director certificate is a CA")
	}

	for _, role := range []Role{RoleEnvoy, RoleResearcher, RoleAdmin} {
		iss, err := ca.Issue(IssueRequest{Role: role, Name: "party-" + string(role)})
		if err != nil {
			t.Fatalf("Issue %s: %v", role, err)
		}
		c := iss.Cert
		if !slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) {
			t.Errorf("%s ext key usage = %v, want client auth only", role, c.ExtKeyUsage)
		}
		if len(c.DNSNames)+len(c.IPAddresses) != 0 {
			t.Errorf("%s certificate has SANs %v %v", role, c.DNSNames, c.IPAddresses)
		}
		if !slices.Equal(c.Subject.OrganizationalUnit, []string{string(role)}) || c.Subject.CommonName != "party-"+string(role) {
			t.Errorf("%s subject = %v", role, c.Subject)
		}
		if life := c.NotAfter.Sub(c.NotBefore); life < 365*24*time.Hour || life > 366*24*time.Hour {
			t.Errorf("%s certificate lives %s, want a year by default", role, life)
		}
	}

	short, err := ca.Issue(IssueRequest{Role: RoleEnvoy, Name: "brief", TTL: 2 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if until := time.Until(short.Cert.NotAfter); until > 2*time.Hour || until < time.Hour {
		t.Errorf("TTL 2h gave a certificate valid for %s more", until)
	}
}

func TestIssueRefusesBadRequests(t *testing.T) {
	ca := newTestCA(t)
	tests := []struct {
		req  IssueRequest
		want string
	}{
		{IssueRequest{Role: "owner", Name: "x"}, "not a certificate role"},
		{IssueRequest{Role: RoleEnvoy, Name: "../etc"}, "may not start with"},
		{IssueRequest{Role: RoleEnvoy, Name: "a/b"}, "contains"},
		{IssueRequest{Role: RoleEnvoy, Name: ""}, "empty"},
		{IssueRequest{Role: RoleEnvoy, Name: strings.Repeat("a", 65)}, "limit is 64"},
		{IssueRequest{Role: RoleEnvoy, Name: "site", Hosts: []string{"site.example"}}, "only director certificates carry hosts"},
		{IssueRequest{Role: RoleDirector, Name: "d", Hosts: []string{"*.example"}}, "no wildcards"},
		{IssueRequest{Role: RoleDirector, Name: "director_1"}, "not a DNS name"},
		{IssueRequest{Role: RoleEnvoy, Name: "site", TTL: 20 * 365 * 24 * time.Hour}, "after the signing CA"},
		{IssueRequest{Role: RoleEnvoy, Name: "site", TTL: -time.Hour}, "negative"},
	}
	for _, tc := range tests {
		if _, err := ca.Issue(tc.req); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Issue(%+v) = %v, want an error containing %q", tc.req, err, tc.want)
		}
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "site-1", "Site_2.eu", "director.example.org", strings.Repeat("x", 64), "1"} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("ValidateName(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".hidden", "-rf", "a b", "a/b", `a\b`, "é", "a:b", strings.Repeat("x", 65), "..", "a\x00"} {
		if err := ValidateName(bad); err == nil {
			t.Errorf("ValidateName(%q) accepted", bad)
		}
	}
}

func TestWriteFilesNeverOverwritesKeys(t *testing.T) {
	ca := newTestCA(t)
	files, _ := issueFiles(t, ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	fi, err := os.Stat(files.Key)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("key mode %v, want 0600", fi.Mode().Perm())
	}
	keyBefore, _ := os.ReadFile(files.Key)
	again, err := ca.Issue(IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := again.WriteFiles(filepath.Dir(files.Key)); !errors.Is(err, ErrExists) {
		t.Fatalf("writing a second key over site-1.key: %v, want ErrExists", err)
	}
	if keyAfter, _ := os.ReadFile(files.Key); !bytes.Equal(keyBefore, keyAfter) {
		t.Fatal("site-1.key was replaced")
	}

	// A ca.crt of another federation is not replaced either.
	other := newTestCA(t)
	iss, err := other.Issue(IssueRequest{Role: RoleEnvoy, Name: "site-9"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := iss.WriteFiles(filepath.Dir(files.Key)); !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "different root") {
		t.Fatalf("writing another federation's root over ca.crt: %v", err)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(files.Key), "site-9.key")); !os.IsNotExist(err) {
		t.Fatal("a refused WriteFiles still wrote the key")
	}
}

func TestCSRFlowCAEnforcesItsOwnDecision(t *testing.T) {
	ca := newTestCA(t)
	site := t.TempDir()
	// The site asks for admin rights and a host; the CA signs it as an envoy.
	keyPath, csrPath, err := WriteCSR(site, CSRRequest{Name: "site-7", Role: RoleAdmin})
	if err != nil {
		t.Fatalf("WriteCSR: %v", err)
	}
	if fi, _ := os.Stat(keyPath); fi.Mode().Perm() != 0o600 {
		t.Fatalf("site key mode %v, want 0600", fi.Mode().Perm())
	}
	keyBefore, _ := os.ReadFile(keyPath)
	csrPEM, err := os.ReadFile(csrPath)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := ca.SignCSR(csrPEM, IssueRequest{Role: RoleEnvoy})
	if err != nil {
		t.Fatalf("SignCSR: %v", err)
	}
	if iss.KeyPEM != nil {
		t.Fatal("SignCSR returned a key: the key must stay at the site")
	}
	if got := iss.Identity; got.Name != "site-7" || got.Role != RoleEnvoy {
		t.Fatalf("signed identity %+v, want envoy site-7", got)
	}
	if !slices.Equal(iss.Cert.Subject.OrganizationalUnit, []string{"envoy"}) || iss.Cert.IsCA ||
		!slices.Equal(iss.Cert.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) {
		t.Fatalf("signed certificate OU=%v IsCA=%v EKU=%v", iss.Cert.Subject.OrganizationalUnit, iss.Cert.IsCA, iss.Cert.ExtKeyUsage)
	}

	files, id, err := ImportCertificate(site, iss.ChainPEM, iss.RootPEM)
	if err != nil {
		t.Fatalf("ImportCertificate: %v", err)
	}
	if id.Name != "site-7" || files.Cert != filepath.Join(site, "site-7.crt") {
		t.Fatalf("imported %+v into %+v", id, files)
	}
	if keyAfter, _ := os.ReadFile(keyPath); !bytes.Equal(keyBefore, keyAfter) {
		t.Fatal("the import touched the site's key")
	}
	k, err := NewKeyring(KeyringConfig{Files: files})
	if err != nil {
		t.Fatalf("the imported files do not load: %v", err)
	}
	if k.Identity().Role != RoleEnvoy {
		t.Fatalf("keyring identity %+v", k.Identity())
	}

	// A certificate for another key is refused at import.
	stray, err := ca.Issue(IssueRequest{Role: RoleEnvoy, Name: "site-7"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ImportCertificate(site, stray.ChainPEM, stray.RootPEM); err == nil || !strings.Contains(err.Error(), "not issued for the key") {
		t.Fatalf("importing a certificate for another key: %v", err)
	}
	// A certificate that does not chain to the given root is refused.
	other := newTestCA(t)
	if _, _, err := ImportCertificate(site, iss.ChainPEM, other.RootPEM()); err == nil || !strings.Contains(err.Error(), "does not verify") {
		t.Fatalf("importing against another root: %v", err)
	}
}

func TestSignCSRForDirectorTakesHosts(t *testing.T) {
	ca := newTestCA(t)
	_, csrPEM, err := NewCSR(CSRRequest{Name: "director.example.org", Role: RoleDirector, Hosts: []string{"director.example.org", "192.0.2.1"}})
	if err != nil {
		t.Fatal(err)
	}
	iss, err := ca.SignCSR(csrPEM, IssueRequest{Role: RoleDirector})
	if err != nil {
		t.Fatal(err)
	}
	if got := certificateHosts(iss.Cert); !slices.Equal(got, []string{"director.example.org", "192.0.2.1"}) {
		t.Fatalf("director hosts from the CSR = %v", got)
	}
	// The CA's own --host list wins over the CSR's.
	iss, err = ca.SignCSR(csrPEM, IssueRequest{Role: RoleDirector, Hosts: []string{"d.internal"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := certificateHosts(iss.Cert); !slices.Equal(got, []string{"d.internal"}) {
		t.Fatalf("director hosts with the CA's list = %v", got)
	}
	// An envoy signed from the same CSR carries no hosts.
	iss, err = ca.SignCSR(csrPEM, IssueRequest{Role: RoleEnvoy, Name: "site-3"})
	if err != nil {
		t.Fatal(err)
	}
	if got := certificateHosts(iss.Cert); len(got) != 0 || iss.Identity.Name != "site-3" {
		t.Fatalf("envoy from a director CSR: hosts %v, identity %+v", got, iss.Identity)
	}
	if _, err := ca.SignCSR([]byte("not a csr"), IssueRequest{Role: RoleEnvoy}); err == nil {
		t.Fatal("SignCSR accepted garbage")
	}
}

func TestRevocationAndCRL(t *testing.T) {
	ca := newTestCA(t)
	a1, err := ca.Issue(IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	if err != nil {
		t.Fatal(err)
	}
	a2, err := ca.Issue(IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := ca.Issue(IssueRequest{Role: RoleEnvoy, Name: "site-2"})
	if err != nil {
		t.Fatal(err)
	}

	revs, err := ca.RevokeName("site-1")
	if err != nil || len(revs) != 2 {
		t.Fatalf("RevokeName(site-1) = %v, %v; want both certificates", revs, err)
	}
	if _, err := ca.RevokeName("site-1"); !errors.Is(err, ErrAlreadyRevoked) {
		t.Fatalf("RevokeName twice: %v, want ErrAlreadyRevoked", err)
	}
	if _, err := ca.RevokeName("nobody"); err == nil || !strings.Contains(err.Error(), "no certificate named nobody") {
		t.Fatalf("RevokeName(nobody): %v", err)
	}
	if _, err := ca.Revoke(a1.Cert.SerialNumber); !errors.Is(err, ErrAlreadyRevoked) {
		t.Fatalf("Revoke of a revoked serial: %v, want ErrAlreadyRevoked", err)
	}

	data, err := os.ReadFile(ca.CRLPath())
	if err != nil {
		t.Fatal(err)
	}
	crl, err := ParseCRL(data)
	if err != nil {
		t.Fatal(err)
	}
	if err := crl.CheckSignatureFrom(ca.Signing()); err != nil {
		t.Fatalf("CRL not signed by the signing CA: %v", err)
	}
	if time.Until(crl.NextUpdate) < 29*24*time.Hour {
		t.Fatalf("CRL next update %s, want about 30 days ahead", crl.NextUpdate)
	}
	revoked := map[string]bool{}
	for _, e := range crl.RevokedCertificateEntries {
		revoked[FormatSerial(e.SerialNumber)] = true
	}
	if !revoked[FormatSerial(a1.Cert.SerialNumber)] || !revoked[FormatSerial(a2.Cert.SerialNumber)] || revoked[FormatSerial(b.Cert.SerialNumber)] {
		t.Fatalf("CRL revokes %v", revoked)
	}
	firstNumber := crl.Number

	path, next, err := ca.WriteCRL(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	data, _ = os.ReadFile(path)
	crl, err = ParseCRL(data)
	if err != nil {
		t.Fatal(err)
	}
	if crl.Number.Cmp(firstNumber) <= 0 || !crl.NextUpdate.Equal(next.UTC().Truncate(time.Second)) || time.Until(next) > time.Hour {
		t.Fatalf("re-issued CRL number %v (was %v), next update %s", crl.Number, firstNumber, crl.NextUpdate)
	}

	list, err := ca.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 {
		t.Fatalf("List has %d certificates, want 3", len(list))
	}
	for _, c := range list {
		if c.Revoked != (c.Name == "site-1") {
			t.Errorf("List: %s revoked=%v", c.Name, c.Revoked)
		}
	}
	if _, err := ca.Revoke(b.Cert.SerialNumber); err != nil {
		t.Fatalf("Revoke(site-2): %v", err)
	}
	other := newTestCA(t)
	stray, _ := other.Issue(IssueRequest{Role: RoleEnvoy, Name: "x"})
	if _, err := ca.Revoke(stray.Cert.SerialNumber); err == nil || !strings.Contains(err.Error(), "no certificate with serial") {
		t.Fatalf("revoking a serial this CA never issued: %v", err)
	}
}

func TestParseSerial(t *testing.T) {
	for _, s := range []string{"3A9F", "3a9f", "0x3A9F", "3A:9F", " 3a9f\n"} {
		n, err := ParseSerial(s)
		if err != nil || FormatSerial(n) != "3A9F" {
			t.Errorf("ParseSerial(%q) = %v, %v", s, n, err)
		}
	}
	for _, s := range []string{"", "xyz", "-1"} {
		if _, err := ParseSerial(s); err == nil {
			t.Errorf("ParseSerial(%q) accepted", s)
		}
	}
}

func TestKeyringRefusesBadFiles(t *testing.T) {
	ca := newTestCA(t)
	files, iss := issueFiles(t, ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	dir := t.TempDir()

	leafOnly := filepath.Join(dir, "leaf.crt")
	if err := os.WriteFile(leafOnly, encodeCertificates(iss.Cert), 0o644); err != nil {
		t.Fatal(err)
	}
	other := newTestCA(t)
	otherFiles, _ := issueFiles(t, other, IssueRequest{Role: RoleEnvoy, Name: "site-1"})

	tests := []struct {
		name  string
		files Files
		want  string
	}{
		{"leaf without intermediate", Files{Cert: leafOnly, Key: files.Key, CA: files.CA}, "only the leaf"},
		{"key of another certificate", Files{Cert: files.Cert, Key: otherFiles.Key, CA: files.CA}, "private key does not match"},
		{"root of another federation", Files{Cert: files.Cert, Key: files.Key, CA: otherFiles.CA}, "does not chain to the federation root"},
		{"CRL of another federation", Files{Cert: files.Cert, Key: files.Key, CA: files.CA, CRL: other.CRLPath()}, "is not signed by the signing CA"},
		{"missing CA file", Files{Cert: files.Cert, Key: files.Key, CA: filepath.Join(dir, "nope.crt")}, "nope.crt"},
	}
	for _, tc := range tests {
		if _, err := NewKeyring(KeyringConfig{Files: tc.files}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: NewKeyring = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}

	expired, err := ca.Issue(IssueRequest{Role: RoleEnvoy, Name: "late", NotBefore: time.Now().Add(-2 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	ef, err := expired.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewKeyring(KeyringConfig{Files: ef}); err == nil || !strings.Contains(err.Error(), "expired at") {
		t.Fatalf("NewKeyring with an expired certificate: %v", err)
	}
}

// A half-replaced pair (new certificate, old key) keeps the old material in
// use until the key arrives too.
func TestKeyringKeepsOldMaterialWhileFilesAreInconsistent(t *testing.T) {
	ca := newTestCA(t)
	files, first := issueFiles(t, ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	k, err := NewKeyring(KeyringConfig{Files: files, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	renewed, second := issueFiles(t, ca, IssueRequest{Role: RoleEnvoy, Name: "site-1"})
	if err := os.Rename(renewed.Cert, files.Cert); err != nil {
		t.Fatal(err)
	}
	if got := k.Identity().Serial; got != FormatSerial(first.Cert.SerialNumber) {
		t.Fatalf("with a mismatched key the keyring switched to %s", got)
	}
	if err := k.Reload(); err == nil || !strings.Contains(err.Error(), "private key does not match") {
		t.Fatalf("Reload with a mismatched key: %v", err)
	}
	if err := os.Rename(renewed.Key, files.Key); err != nil {
		t.Fatal(err)
	}
	if got := k.Identity().Serial; got != FormatSerial(second.Cert.SerialNumber) {
		t.Fatalf("after the key arrived the keyring has %s, want %s", got, FormatSerial(second.Cert.SerialNumber))
	}
}

func TestOpenSSLAcceptsChains(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("openssl not installed")
	}
	ca := newTestCA(t)
	signing := filepath.Join(ca.Dir(), SigningCertFile)
	root := filepath.Join(ca.Dir(), RootCertFile)
	site := t.TempDir()
	_, csrPath, err := WriteCSR(site, CSRRequest{Name: "site-csr", Role: RoleEnvoy})
	if err != nil {
		t.Fatal(err)
	}
	csrPEM, _ := os.ReadFile(csrPath)
	signed, err := ca.SignCSR(csrPEM, IssueRequest{Role: RoleEnvoy})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ImportCertificate(site, signed.ChainPEM, signed.RootPEM); err != nil {
		t.Fatal(err)
	}

	for _, req := range []IssueRequest{
		{Role: RoleDirector, Name: "director.test", Hosts: []string{"localhost", "127.0.0.1"}},
		{Role: RoleEnvoy, Name: "site-1"},
		{Role: RoleResearcher, Name: "ada"},
		{Role: RoleAdmin, Name: "ops"},
	} {
		files, _ := issueFiles(t, ca, req)
		purpose := "sslclient"
		if req.Role == RoleDirector {
			purpose = "sslserver"
		}
		// The leaf alone against root + untrusted intermediate, and the
		// whole chain file as the parties send it.
		leaf := filepath.Join(t.TempDir(), "leaf.pem")
		chain, _ := readCertificates(files.Cert)
		if err := os.WriteFile(leaf, encodeCertificates(chain[0]), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{
			{"verify", "-purpose", purpose, "-CAfile", root, "-untrusted", signing, leaf},
			{"verify", "-purpose", purpose, "-CAfile", files.CA, "-untrusted", files.Cert, files.Cert},
		} {
			if out, err := exec.Command(openssl, args...).CombinedOutput(); err != nil || !strings.Contains(string(out), "OK") {
				t.Errorf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
	}
	csrFiles := PartyFiles(site, "site-csr")
	if out, err := exec.Command(openssl, "verify", "-CAfile", csrFiles.CA, "-untrusted", csrFiles.Cert, csrFiles.Cert).CombinedOutput(); err != nil {
		t.Errorf("openssl verify of the CSR-signed chain: %v\n%s", err, out)
	}
	if out, err := exec.Command(openssl, "crl", "-in", ca.CRLPath(), "-CAfile", signing, "-noout").CombinedOutput(); err != nil || !strings.Contains(string(out), "verify OK") {
		t.Errorf("openssl crl -verify: %v\n%s", err, out)
	}
}

// During a root rotation a party's ca.crt bundles the old and the new root:
// certificates of either CA load, and writing the new CA's files keeps the
// bundle.
func TestRootBundle(t *testing.T) {
	oldCA, newCA := newTestCA(t), newTestCA(t)
	dir := t.TempDir()
	bundle := append(oldCA.RootPEM(), newCA.RootPEM()...)
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), bundle, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, ca := range []*CA{oldCA, newCA} {
		_, files, err := ca.IssueTo(dir, IssueRequest{Role: RoleEnvoy, Name: "site-" + FormatSerial(ca.Root().SerialNumber)[:6]})
		if err != nil {
			t.Fatalf("IssueTo with a bundle that holds the root: %v", err)
		}
		if got, _ := os.ReadFile(files.CA); !bytes.Equal(got, bundle) {
			t.Fatal("writing files replaced the bundle")
		}
		if _, err := NewKeyring(KeyringConfig{Files: files}); err != nil {
			t.Fatalf("a certificate of one root of the bundle does not load: %v", err)
		}
	}
}
