package app

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
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
	out, err = run(t, "pki", "list", "--dir", caDir, "--output", "json")
	var listed []struct {
		Role, Name, Status string
		RevokedAt          *time.Time `json:"revoked_at"`
	}
	if err != nil || json.Unmarshal([]byte(out), &listed) != nil || len(listed) == 0 {
		t.Fatalf("pki list --output json: %q, %v", out, err)
	}
	revoked := 0
	for _, c := range listed {
		if c.Status == "revoked" && c.RevokedAt != nil {
			revoked++
		}
	}
	if revoked != 1 {
		t.Errorf("pki list --output json shows %d revoked certificates, want 1: %s", revoked, out)
	}
	if out, err = run(t, "pki", "list", "--dir", caDir, "--output", "yaml"); err != nil || !strings.HasPrefix(out, "---\n") || !strings.Contains(out, "status: revoked") {
		t.Errorf("pki list --output yaml: %q, %v", out, err)
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
	build := exec.Command(goTool, append(args, "..")...) // cmd/fx, the binary
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	script, err := filepath.Abs(filepath.Join("..", "..", "..", "scripts", "pki-bootstrap.sh"))
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

	// A director reached at a DNS name and an address, as the README's
	// several-machines section asks for: it is named by its DNS name, and
	// configs/director.yaml pointed at its files accepts it.
	tmp = t.TempDir()
	out := bootstrap("--hosts", "director.example.org,10.0.0.5", "site-a", "site-b")
	named := filepath.Join(tmp, "pki", "director")
	checkDirector := func(want string) pki.Files {
		t.Helper()
		files := pki.PartyFiles(named, "director.example.org")
		k, err := pki.NewKeyring(pki.KeyringConfig{Files: files})
		if err != nil {
			t.Fatalf("the director certificate: %v\n%s", err, out)
		}
		if got := strings.Join(hostsOf(k.Certificate()), ","); got != want || k.Identity().Name != "director.example.org" {
			t.Errorf("director %s with hosts %s, want director.example.org with %s", k.Identity().Name, got, want)
		}
		s, err := loadDirectorSettings(filepath.Join("..", "..", "..", "configs", "director.yaml"), nil)
		if err != nil {
			t.Fatal(err)
		}
		s.TLS.Cert, s.TLS.Key, s.TLS.CA, s.TLS.CRL = files.Cert, files.Key, files.CA, ""
		s.Advertise.Host = "director.example.org"
		if _, err := s.Config(nil); err != nil {
			t.Errorf("the director refuses its certificate: %v", err)
		}
		return files
	}
	files := checkDirector("director.example.org,10.0.0.5")
	if !strings.Contains(out, "tls.cert: pki/director/director.example.org.crt") {
		t.Errorf("the script does not say which settings the director needs:\n%s", out)
	}
	key, _ := os.ReadFile(files.Key)
	cert, _ := os.ReadFile(files.Cert)

	// Asked again with the same hosts it keeps the certificate; with
	// other hosts it renews it for the same key and says so.
	if out = bootstrap("--hosts", "director.example.org,10.0.0.5", "site-a", "site-b"); !strings.Contains(out, "keep     director") {
		t.Errorf("a rerun with the same hosts did not keep the director certificate:\n%s", out)
	}
	if again, _ := os.ReadFile(files.Cert); !bytes.Equal(cert, again) {
		t.Error("a rerun with the same hosts replaced the director certificate")
	}
	out = bootstrap("--hosts", "director.example.org,10.0.0.7", "site-a", "site-b")
	if !strings.Contains(out, "renewed  director") || !strings.Contains(out, "10.0.0.5") {
		t.Errorf("a rerun with other hosts did not say it renewed the director certificate:\n%s", out)
	}
	checkDirector("director.example.org,10.0.0.7")
	if again, _ := os.ReadFile(files.Key); !bytes.Equal(key, again) {
		t.Error("renewing replaced the director's key")
	}
	// Without --hosts a rerun (say, to add a site) leaves it alone.
	if out = bootstrap("site-c"); strings.Contains(out, "renewed") {
		t.Errorf("a rerun without --hosts renewed a certificate:\n%s", out)
	}
	checkDirector("director.example.org,10.0.0.7")
}

// fx pki renew issues a certificate again for the key the party has: the
// same name and role, new hosts or lifetime, and nothing else changes.
func TestPKIRenew(t *testing.T) {
	tmp := t.TempDir()
	caDir := filepath.Join(tmp, "ca")
	if _, err := run(t, "pki", "init", "--dir", caDir); err != nil {
		t.Fatal(err)
	}
	dirOut := filepath.Join(tmp, "director")
	if _, err := run(t, "pki", "certify", "--dir", caDir, "--role", "director", "--name", "d.example.org", "--host", "d.example.org,10.0.0.5", "--out", dirOut); err != nil {
		t.Fatal(err)
	}
	files := pki.PartyFiles(dirOut, "d.example.org")
	before, err := pki.NewKeyring(pki.KeyringConfig{Files: files})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(files.Key)

	out, err := run(t, "pki", "renew", "--dir", caDir, "--cert", files.Cert, "--host", "d.example.org,10.0.0.9")
	if err != nil || !strings.Contains(out, "hosts were   d.example.org, 10.0.0.5") || !strings.Contains(out, "stays valid") {
		t.Fatalf("pki renew: %q, %v", out, err)
	}
	after, err := pki.NewKeyring(pki.KeyringConfig{Files: files})
	if err != nil {
		t.Fatalf("the renewed certificate does not load with the key: %v", err)
	}
	if got := strings.Join(hostsOf(after.Certificate()), ","); got != "d.example.org,10.0.0.9" {
		t.Errorf("renewed hosts %s", got)
	}
	if after.Identity().Name != "d.example.org" || after.Identity().Role != pki.RoleDirector || after.Identity().Serial == before.Identity().Serial {
		t.Errorf("renewed %+v, was %+v: want the same name and role, a new serial", after.Identity(), before.Identity())
	}
	if again, _ := os.ReadFile(files.Key); !bytes.Equal(key, again) {
		t.Error("renew replaced the key")
	}

	// Without --host the hosts stay; --ttl sets the lifetime.
	if _, err := run(t, "pki", "renew", "--dir", caDir, "--cert", files.Cert, "--ttl", "720h"); err != nil {
		t.Fatal(err)
	}
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: files})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(hostsOf(k.Certificate()), ","); got != "d.example.org,10.0.0.9" {
		t.Errorf("hosts after a renewal without --host: %s", got)
	}
	if left := time.Until(k.Certificate().NotAfter); left > 721*time.Hour || left < 700*time.Hour {
		t.Errorf("--ttl 720h gave a certificate valid for another %s", left)
	}

	// An envoy takes no hosts; a key that is not the certificate's is refused.
	site := filepath.Join(tmp, "site-1")
	if _, err := run(t, "pki", "certify", "--dir", caDir, "--role", "envoy", "--name", "site-1", "--out", site); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, "pki", "renew", "--dir", caDir, "--cert", filepath.Join(site, "site-1.crt"), "--host", "x.example.org"); err == nil || !strings.Contains(err.Error(), "only director certificates carry hosts") {
		t.Errorf("renew of an envoy with --host: %v", err)
	}
	if err := os.WriteFile(filepath.Join(site, "site-1.key"), key, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, "pki", "renew", "--dir", caDir, "--cert", filepath.Join(site, "site-1.crt")); err == nil || !strings.Contains(err.Error(), "does not belong") {
		t.Errorf("renew with another party's key: %v", err)
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
