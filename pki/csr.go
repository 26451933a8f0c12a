package pki

import (
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cloudflare/cfssl/csr"
)

// CSRRequest describes the certificate a site asks the CA for. The CA has the
// last word on every field: it sets the role from its own command line and
// ignores what it does not allow.
type CSRRequest struct {
	Name  string
	Role  Role
	Hosts []string // director only: the names and addresses it is reached on
}

// NewCSR makes a private key and a certificate request for it. The key stays
// at the site; only the request travels to the CA.
func NewCSR(req CSRRequest) (keyPEM, csrPEM []byte, err error) {
	if err := validateIssue(&IssueRequest{Role: req.Role, Name: req.Name, Hosts: req.Hosts}); err != nil {
		return nil, nil, err
	}
	hosts := req.Hosts
	if req.Role == RoleDirector && len(hosts) == 0 {
		if err := nameAsHost(req.Name); err != nil {
			return nil, nil, err
		}
		hosts = []string{req.Name}
	}
	csrPEM, keyPEM, err = csr.ParseRequest(&csr.CertificateRequest{
		CN:         req.Name,
		Names:      []csr.Name{{OU: string(req.Role)}},
		Hosts:      hosts,
		KeyRequest: leafKeyRequest(),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("making a key and certificate request for %s %s: %w", req.Role, req.Name, err)
	}
	return keyPEM, csrPEM, nil
}

// WriteCSR makes a key and request with NewCSR and writes them to
// dir/NAME.key (mode 0600; refused if it exists) and dir/NAME.csr.
func WriteCSR(dir string, req CSRRequest) (keyPath, csrPath string, err error) {
	keyPEM, csrPEM, err := NewCSR(req)
	if err != nil {
		return "", "", err
	}
	files := PartyFiles(dir, req.Name)
	csrPath = filepath.Join(dir, req.Name+".csr")
	if err := writeKeyFile(files.Key, keyPEM); err != nil {
		return "", "", err
	}
	if err := writeFileAtomic(csrPath, csrPEM, 0o644); err != nil {
		return "", "", err
	}
	return files.Key, csrPath, nil
}

// ImportCertificate installs a certificate that the CA signed for a key made
// by WriteCSR. It checks, before writing anything, that the chain verifies
// against the root in rootPEM and that the leaf belongs to dir/NAME.key
// (NAME being the certificate's CN); then it writes dir/NAME.crt and
// dir/ca.crt. ca.crt is refused if it already holds a different root.
func ImportCertificate(dir string, chainPEM, rootPEM []byte) (Files, Identity, error) {
	chain, err := ParseCertificatesPEM(chainPEM)
	if err != nil {
		return Files{}, Identity{}, fmt.Errorf("reading the certificate to import: %w", err)
	}
	roots, err := ParseCertificatesPEM(rootPEM)
	if err != nil {
		return Files{}, Identity{}, fmt.Errorf("reading the root certificate: %w", err)
	}
	leaf := chain[0]
	id, err := IdentityFromCertificate(leaf)
	if err != nil {
		return Files{}, Identity{}, err
	}
	if err := VerifyChain(chain, roots, time.Now()); err != nil {
		return Files{}, Identity{}, fmt.Errorf("the certificate for %s does not verify against the given root: %w", id.Name, err)
	}
	files := PartyFiles(dir, id.Name)
	key, err := readPrivateKey(files.Key)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return Files{}, Identity{}, fmt.Errorf("no key %s for the certificate's name %s: import into the directory where `fx pki csr` wrote the key", files.Key, id.Name)
		}
		return Files{}, Identity{}, err
	}
	if !publicKeysEqual(leaf.PublicKey, key.Public()) {
		return Files{}, Identity{}, fmt.Errorf("the certificate for %s was not issued for the key in %s: was the request made with another key?", id.Name, files.Key)
	}
	if err := checkRootFile(files.CA, rootPEM); err != nil {
		return Files{}, Identity{}, err
	}
	if err := writeRootFile(files.CA, rootPEM); err != nil {
		return Files{}, Identity{}, err
	}
	if err := writeFileAtomic(files.Cert, chainPEM, 0o644); err != nil {
		return Files{}, Identity{}, err
	}
	return files, id, nil
}

// VerifyChain checks that chain[0] verifies against roots with chain[1:] as
// intermediates, for any key usage (the caller checks usages when it
// matters), and was issued by a signing CA (see issuedBySigningCA).
func VerifyChain(chain, roots []*x509.Certificate, now time.Time) error {
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	chains, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return err
	}
	return issuedBySigningCA(chains)
}

var errSignedByRoot = errors.New("signed by the federation root")

// issuedBySigningCA refuses verified chains (leaf first, root last) in which
// the leaf was signed by a root itself. An fx root signs only its signing
// CA, and every party's certificate comes from the signing CA, whose CRL is
// the only one parties read: a leaf signed by the root could never be
// revoked. Go's verification alone accepts any chain to a root, so the
// handshakes in both directions call this too.
func issuedBySigningCA(chains [][]*x509.Certificate) error {
	for _, c := range chains {
		if len(c) < 3 {
			leaf, root := c[0], c[len(c)-1]
			return fmt.Errorf("certificate %q (serial %s) is %w %q itself, not by its signing CA: fx roots sign only the signing CA, and only certificates the signing CA issued can be revoked; issue it with `fx pki certify` or `fx pki sign`",
				leaf.Subject.CommonName, FormatSerial(leaf.SerialNumber), errSignedByRoot, root.Subject.CommonName)
		}
	}
	return nil
}
