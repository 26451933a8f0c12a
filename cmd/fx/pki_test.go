package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/cloudflare/cfssl/helpers"

	"github.com/fx-fl/fx/pki"
)

func TestPKIHelpDocumentsLayout(t *testing.T) {
	out, err := run(t, "pki", "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"root.crt", "root.key", "signing.crt", "signing.key", "crl.pem", "revoked.json", "issued/", "NAME.crt", "NAME.key", "ca.crt", "certify", "csr", "sign", "import", "revoke", "show"} {
		if !strings.Contains(out, want) {
			t.Errorf("fx pki --help does not mention %q", want)
		}
	}
}

func keyMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestPKICommands(t *testing.T) {
	tmp := t.TempDir()
	caDir := filepath.Join(tmp, "ca")
	if out, err := run(t, "pki", "init", "--dir", caDir, "--org", "acme"); err != nil || !strings.Contains(out, "created the CA") {
		t.Fatalf("pki init: %q, %v", out, err)
	}
	root, _ := os.ReadFile(filepath.Join(caDir, pki.RootCertFile))
	_, err := run(t, "pki", "init", "--dir", caDir)
	if err == nil || !strings.Contains(err.Error(), "would stop being trusted") {
		t.Fatalf("second pki init: %v, want a refusal explaining why", err)
	}
	if again, _ := os.ReadFile(filepath.Join(caDir, pki.RootCertFile)); !bytes.Equal(root, again) {
		t.Fatal("the refused init changed root.crt")
	}

	// certify: director with hosts, envoy without.
	dirOut := filepath.Join(tmp, "director")
	out, err := run(t, "pki", "certify", "--dir", caDir, "--role", "director", "--name", "director.test", "--host", "localhost,127.0.0.1", "--out", dirOut)
	if err != nil || !strings.Contains(out, "localhost, 127.0.0.1") {
		t.Fatalf("certify director: %q, %v", out, err)
	}
	envoyOut := filepath.Join(tmp, "site-1")
	if _, err := run(t, "pki", "certify", "--dir", caDir, "--role", "envoy", "--name", "site-1", "--ttl", "720h", "--out", envoyOut); err != nil {
		t.Fatalf("certify envoy: %v", err)
	}
	for _, f := range []string{"site-1.crt", "site-1.key", "ca.crt"} {
		if _, err := os.Stat(filepath.Join(envoyOut, f)); err != nil {
			t.Fatalf("certify did not write %s: %v", f, err)
		}
	}
	if m := keyMode(t, filepath.Join(envoyOut, "site-1.key")); m != 0o600 {
		t.Fatalf("site-1.key mode %v", m)
	}
	if _, err := run(t, "pki", "certify", "--dir", caDir, "--role", "envoy", "--name", "site-1", "--out", envoyOut); err == nil || !strings.Contains(err.Error(), "never overwrites a private key") {
		t.Fatalf("certify over an existing key: %v", err)
	}
	if _, err := run(t, "pki", "certify", "--dir", caDir, "--role", "owner", "--name", "x", "--out", tmp); err == nil || !strings.Contains(err.Error(), "--role") {
		t.Fatalf("certify with a bad role: %v", err)
	}
	if _, err := run(t, "pki", "certify", "--dir", caDir, "--role", "envoy", "--name", "../x", "--out", tmp); err == nil {
		t.Fatal("certify accepted the name ../x")
	}

	// show: verifies against the root, not revoked.
	crt := filepath.Join(envoyOut, "site-1.crt")
	ca := filepath.Join(envoyOut, "ca.crt")
	crl := filepath.Join(caDir, pki.CRLFile)
	out, err = run(t, "pki", "show", crt, "--ca", ca, "--crl", crl)
	if err != nil {
		t.Fatalf("pki show: %q, %v", out, err)
	}
	for _, want := range []string{"name         site-1", "role         envoy", "verifies     yes", "revoked      no", "serial"} {
		if !strings.Contains(out, want) {
			t.Errorf("pki show output lacks %q:\n%s", want, out)
		}
	}
	other := filepath.Join(tmp, "other")
	if _, err := run(t, "pki", "init", "--dir", other); err != nil {
		t.Fatal(err)
	}
	out, err = run(t, "pki", "show", crt, "--ca", filepath.Join(other, pki.RootCertFile))
	if err == nil || !strings.Contains(out, "verifies     NO") {
		t.Fatalf("pki show against another root: %q, %v", out, err)
	}

	// revoke by name, then show sees it in the CRL.
	out, err = run(t, "pki", "revoke", "--dir", caDir, "--name", "site-1")
	if err != nil || !strings.Contains(out, "revoked envoy site-1") || !strings.Contains(out, crl) {
		t.Fatalf("pki revoke: %q, %v", out, err)
	}
	out, err = run(t, "pki", "show", crt, "--ca", ca, "--crl", crl)
	if err == nil || !strings.Contains(out, "revoked      YES") {
		t.Fatalf("pki show of a revoked certificate: %q, %v", out, err)
	}
	if _, err := run(t, "pki", "revoke", "--dir", caDir); err == nil || !strings.Contains(err.Error(), "exactly one of --name and --serial") {
		t.Fatalf("revoke without a target: %v", err)
	}
	out, err = run(t, "pki", "crl", "--dir", caDir, "--next-update", "48h")
	if err != nil || !strings.Contains(out, "1 revocation(s)") {
		t.Fatalf("pki crl: %q, %v", out, err)
	}
	out, err = run(t, "pki", "list", "--dir", caDir)
	if err != nil || !strings.Contains(out, "revoked") || !strings.Contains(out, "director.test") {
		t.Fatalf("pki list: %q, %v", out, err)
	}

	// CSR flow: the site asks for admin; the CA signs an envoy.
	site := filepath.Join(tmp, "site-2")
	if _, err := run(t, "pki", "csr", "--name", "site-2", "--role", "admin", "--out", site); err != nil {
		t.Fatalf("pki csr: %v", err)
	}
	if m := keyMode(t, filepath.Join(site, "site-2.key")); m != 0o600 {
		t.Fatalf("site-2.key mode %v", m)
	}
	out, err = run(t, "pki", "show", filepath.Join(site, "site-2.csr"))
	if err != nil || !strings.Contains(out, "admin (asked for") {
		t.Fatalf("pki show of a CSR: %q, %v", out, err)
	}
	signed := filepath.Join(tmp, "signed")
	out, err = run(t, "pki", "sign", "--dir", caDir, "--csr", filepath.Join(site, "site-2.csr"), "--role", "envoy", "--out", signed)
	if err != nil || !strings.Contains(out, `asked for role "admin"`) || !strings.Contains(out, "issued envoy site-2") {
		t.Fatalf("pki sign: %q, %v", out, err)
	}
	if _, err := os.Stat(filepath.Join(signed, "site-2.key")); !os.IsNotExist(err) {
		t.Fatal("pki sign wrote a key")
	}
	out, err = run(t, "pki", "import", "--crt", filepath.Join(signed, "site-2.crt"), "--ca", filepath.Join(signed, "ca.crt"), "--out", site)
	if err != nil || !strings.Contains(out, "installed envoy site-2") {
		t.Fatalf("pki import: %q, %v", out, err)
	}
	if _, err := run(t, "pki", "show", filepath.Join(site, "site-2.crt"), "--ca", filepath.Join(site, "ca.crt"), "--crl", crl); err != nil {
		t.Fatalf("show of the imported certificate: %v", err)
	}
}

func raceEnabled() bool {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range info.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

func TestPKIBootstrapScript(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not installed")
	}
	if testing.Short() {
		t.Skip("builds the fx binary")
	}
	tmp := t.TempDir()
	fx := filepath.Join(tmp, "fx")
	goTool := filepath.Join(runtime.GOROOT(), "bin", "go")
	args := []string{"build", "-o", fx}
	if raceEnabled() {
		// The packages are already compiled with -race for this test run;
		// building the binary the same way reuses them.
		args = append(args, "-race")
	}
	build := exec.Command(goTool, append(args, ".")...)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	script, err := filepath.Abs(filepath.Join("..", "..", "scripts", "pki-bootstrap.sh"))
	if err != nil {
		t.Fatal(err)
	}
	bootstrap := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(bash, append([]string{script}, args...)...)
		cmd.Dir = tmp
		cmd.Env = append(os.Environ(), "FX="+fx)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("pki-bootstrap.sh %v: %v\n%s", args, err, out)
		}
		return string(out)
	}

	first := bootstrap()
	pkiDir := filepath.Join(tmp, "pki")
	rootPath := filepath.Join(pkiDir, "ca", pki.RootCertFile)
	root, err := os.ReadFile(rootPath)
	if err != nil {
		t.Fatalf("no root after the first run: %v\n%s", err, first)
	}
	envoyKey := filepath.Join(pkiDir, "envoys", "envoy-2", "envoy-2.key")
	envoyKeyBytes, _ := os.ReadFile(envoyKey)

	second := bootstrap("envoy-1", "envoy-2", "envoy-3", "site-x")
	if !strings.Contains(second, "keep     CA") || !strings.Contains(second, "created  envoy      site-x") {
		t.Fatalf("second run did not keep the CA and add site-x:\n%s", second)
	}
	if again, _ := os.ReadFile(rootPath); !bytes.Equal(root, again) {
		t.Fatal("the second run replaced the root")
	}
	if again, _ := os.ReadFile(envoyKey); !bytes.Equal(envoyKeyBytes, again) {
		t.Fatal("the second run replaced envoy-2.key")
	}

	parties := map[string]string{
		"director/localhost":     "director",
		"envoys/envoy-1/envoy-1": "envoy",
		"envoys/envoy-2/envoy-2": "envoy",
		"envoys/envoy-3/envoy-3": "envoy",
		"envoys/site-x/site-x":   "envoy",
		"researcher/researcher":  "researcher",
		"admin/admin":            "admin",
	}
	for base, role := range parties {
		files := pki.Files{
			Cert: filepath.Join(pkiDir, base+".crt"),
			Key:  filepath.Join(pkiDir, base+".key"),
			CA:   filepath.Join(pkiDir, filepath.Dir(base), "ca.crt"),
		}
		if m := keyMode(t, files.Key); m != 0o600 {
			t.Errorf("%s.key has mode %v, want 0600", base, m)
		}
		k, err := pki.NewKeyring(pki.KeyringConfig{Files: files})
		if err != nil {
			t.Errorf("%s does not load: %v", base, err)
			continue
		}
		if got := k.Identity(); string(got.Role) != role || got.Name != filepath.Base(base) {
			t.Errorf("%s identity %+v, want %s %s", base, got, role, filepath.Base(base))
		}
	}
	director, err := pki.NewKeyring(pki.KeyringConfig{Files: pki.PartyFiles(filepath.Join(pkiDir, "director"), "localhost")})
	if err != nil {
		t.Fatal(err)
	}
	if hosts := strings.Join(director.Certificate().DNSNames, ","); hosts != "localhost" || len(director.Certificate().IPAddresses) != 1 {
		t.Errorf("director SANs %v %v, want localhost and 127.0.0.1", director.Certificate().DNSNames, director.Certificate().IPAddresses)
	}
}

// A leaf the root signed itself, bypassing the signing CA, is refused by
// every fx party (it could never be revoked), so `fx pki show` must not call
// it valid.
func TestPKIShowRefusesLeafSignedByRoot(t *testing.T) {
	tmp := t.TempDir()
	caDir := filepath.Join(tmp, "ca")
	if _, err := run(t, "pki", "init", "--dir", caDir); err != nil {
		t.Fatal(err)
	}
	rootPEM, err := os.ReadFile(filepath.Join(caDir, pki.RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := pki.ParseCertificatesPEM(rootPEM)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(caDir, pki.RootKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	rootKey, err := helpers.ParsePrivateKeyPEM(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(4242),
		Subject:      pkix.Name{CommonName: "site-9", OrganizationalUnit: []string{"envoy"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, roots[0], key.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	crt := filepath.Join(tmp, "forged.crt")
	if err := os.WriteFile(crt, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "pki", "show", crt, "--ca", filepath.Join(caDir, pki.RootCertFile))
	if err == nil || !strings.Contains(out, "verifies     NO") || !strings.Contains(out, "signing CA") {
		t.Fatalf("pki show of a root-signed leaf: %q, %v; want verifies NO, naming the signing CA", out, err)
	}
}
