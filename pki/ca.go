package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/cloudflare/cfssl/config"
	"github.com/cloudflare/cfssl/csr"
	"github.com/cloudflare/cfssl/helpers"
	"github.com/cloudflare/cfssl/initca"
	"github.com/cloudflare/cfssl/signer"
	"github.com/cloudflare/cfssl/signer/local"
)

// The files of a CA directory. The layout is documented in `fx pki --help`.
const (
	// RootCertFile is the federation root, copied to every party as ca.crt.
	RootCertFile = "root.crt"
	// RootKeyFile signs only the signing CA; after `fx pki init` it can be
	// moved offline.
	RootKeyFile = "root.key"
	// SigningCertFile is the signing (intermediate) CA that issues every
	// leaf and the CRL.
	SigningCertFile = "signing.crt"
	// SigningKeyFile is the signing CA's key, needed for every issuance and
	// revocation.
	SigningKeyFile = "signing.key"
	// CRLFile is the current certificate revocation list.
	CRLFile = "crl.pem"
	// RevokedFile records every revoked certificate; the CRL is made from it.
	RevokedFile = "revoked.json"
	// IssuedDir keeps a copy of every certificate issued, named SERIAL.crt,
	// so that revocation by name knows which serials a name holds.
	IssuedDir = "issued"
)

// Lifetimes used when the caller does not choose one.
const (
	// DefaultCATTL is the lifetime of the root and signing CA: replacing a
	// root means re-issuing every certificate of the federation.
	DefaultCATTL = 10 * 365 * 24 * time.Hour
	// DefaultLeafTTL is the lifetime of a party's certificate.
	DefaultLeafTTL = 365 * 24 * time.Hour
	// DefaultCRLValidity is how far ahead a CRL's next-update time is set.
	DefaultCRLValidity = 30 * 24 * time.Hour
	// backdate absorbs clock skew between the CA and the parties.
	backdate = 5 * time.Minute
)

// ErrCAExists is wrapped by InitCA when the directory already holds a CA.
var ErrCAExists = errors.New("a CA already exists")

// caKey is the key type of the CA: ECDSA P-384, as cfssl names it.
func caKeyRequest() *csr.KeyRequest { return &csr.KeyRequest{A: "ecdsa", S: 384} }

// leafKeyRequest is the key type of every party key made by fx.
func leafKeyRequest() *csr.KeyRequest { return &csr.KeyRequest{A: "ecdsa", S: 384} }

// InitOptions chooses how a new CA is made.
type InitOptions struct {
	// Organization is the O of every subject the CA issues, usually the
	// federation's name. Default "fx".
	Organization string
	// TTL is the lifetime of the root and the signing CA. Default
	// DefaultCATTL.
	TTL time.Duration
}

// CA is an open CA directory: the signing CA's certificate and key, and the
// root that every party trusts.
type CA struct {
	dir        string
	root       *x509.Certificate
	signing    *x509.Certificate
	signingKey crypto.Signer
	signer     *local.Signer

	// CRLValidity is how far ahead the next-update time of the CRLs written
	// by Revoke, RevokeName and WriteCRL is set. OpenCA sets
	// DefaultCRLValidity.
	CRLValidity time.Duration
	// now is the clock, replaced in tests.
	now func() time.Time
}

// InitCA creates a new CA in dir: an ECDSA P-384 root and a signing CA with
// path length zero issued by it, their keys (mode 0600), an empty revocation
// list and its CRL. It refuses when dir already holds any part of a CA,
// because a new root would cut off every party whose certificate chains to
// the current one.
func InitCA(dir string, opts InitOptions) (*CA, error) {
	if opts.Organization == "" {
		opts.Organization = "fx"
	}
	if opts.TTL == 0 {
		opts.TTL = DefaultCATTL
	}
	if opts.TTL < 0 {
		return nil, fmt.Errorf("CA lifetime %s is negative", opts.TTL)
	}
	for _, f := range []string{RootCertFile, RootKeyFile, SigningCertFile, SigningKeyFile} {
		path := filepath.Join(dir, f)
		exists, err := fileExists(path)
		if err != nil {
			return nil, fmt.Errorf("checking %s: %w", path, err)
		}
		if exists {
			return nil, fmt.Errorf("%s holds %s: %w; fx will not make a new root there, because every certificate issued so far chains to the current one and would stop being trusted; use `fx pki certify` or `fx pki sign` to issue more certificates, or an empty directory for a new federation", dir, f, ErrCAExists)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, IssuedDir), 0o700); err != nil {
		return nil, fmt.Errorf("creating CA directory %s: %w", dir, err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("restricting CA directory %s to its owner: %w", dir, err)
	}

	// The root: self-signed, may sign one level of CA below it.
	rootReq := &csr.CertificateRequest{
		CN:         opts.Organization + " root CA",
		Names:      []csr.Name{{O: opts.Organization}},
		KeyRequest: caKeyRequest(),
		CA: &csr.CAConfig{
			PathLength: 1,
			Expiry:     opts.TTL.String(),
		},
	}
	rootPEM, _, rootKeyPEM, err := initca.New(rootReq)
	if err != nil {
		return nil, fmt.Errorf("making the root CA: %w", err)
	}
	root, err := helpers.ParseCertificatePEM(rootPEM)
	if err != nil {
		return nil, fmt.Errorf("reading back the new root CA: %w", err)
	}
	rootKey, err := helpers.ParsePrivateKeyPEM(rootKeyPEM)
	if err != nil {
		return nil, fmt.Errorf("reading back the new root key: %w", err)
	}

	// The signing CA: path length zero, so it can issue leaves but no CA.
	signingCSR, signingKeyPEM, err := csr.ParseRequest(&csr.CertificateRequest{
		CN:         opts.Organization + " signing CA",
		Names:      []csr.Name{{O: opts.Organization}},
		KeyRequest: caKeyRequest(),
	})
	if err != nil {
		return nil, fmt.Errorf("making the signing CA key: %w", err)
	}
	rootSigner, err := local.NewSigner(rootKey, root, signer.DefaultSigAlgo(rootKey), &config.Signing{
		Default: &config.SigningProfile{
			Usage:        []string{"cert sign", "crl sign"},
			Expiry:       opts.TTL,
			ExpiryString: opts.TTL.String(),
			CAConstraint: config.CAConstraint{IsCA: true, MaxPathLen: 0, MaxPathLenZero: true},
			CSRWhitelist: &config.CSRWhitelist{Subject: true, PublicKey: true, PublicKeyAlgorithm: true, SignatureAlgorithm: true},
		},
	})
	if err != nil {
		return nil, fmt.Errorf("preparing the root to sign the signing CA: %w", err)
	}
	now := time.Now()
	signingPEM, err := rootSigner.Sign(signer.SignRequest{
		Request:   string(signingCSR),
		NotBefore: now.Add(-backdate),
		NotAfter:  root.NotAfter,
	})
	if err != nil {
		return nil, fmt.Errorf("signing the signing CA with the root: %w", err)
	}

	if err := writeKeyFile(filepath.Join(dir, RootKeyFile), rootKeyPEM); err != nil {
		return nil, err
	}
	if err := writeKeyFile(filepath.Join(dir, SigningKeyFile), signingKeyPEM); err != nil {
		return nil, err
	}
	if err := writeFileAtomic(filepath.Join(dir, RootCertFile), rootPEM, 0o644); err != nil {
		return nil, err
	}
	if err := writeFileAtomic(filepath.Join(dir, SigningCertFile), signingPEM, 0o644); err != nil {
		return nil, err
	}
	ca, err := OpenCA(dir)
	if err != nil {
		return nil, err
	}
	if _, _, err := ca.WriteCRL(ca.CRLValidity); err != nil {
		return nil, err
	}
	return ca, nil
}

// OpenCA opens the CA in dir for issuing and revoking. It needs root.crt,
// signing.crt and signing.key; root.key may be offline.
func OpenCA(dir string) (*CA, error) {
	rootPath := filepath.Join(dir, RootCertFile)
	if ok, _ := fileExists(rootPath); !ok {
		return nil, fmt.Errorf("%s is not a CA directory (no %s): create one with `fx pki init --dir %s`", dir, RootCertFile, dir)
	}
	roots, err := readCertificates(rootPath)
	if err != nil {
		return nil, fmt.Errorf("reading the root CA: %w", err)
	}
	signingCerts, err := readCertificates(filepath.Join(dir, SigningCertFile))
	if err != nil {
		return nil, fmt.Errorf("reading the signing CA: %w", err)
	}
	key, err := readPrivateKey(filepath.Join(dir, SigningKeyFile))
	if err != nil {
		return nil, fmt.Errorf("reading the signing CA key: %w", err)
	}
	root, signing := roots[0], signingCerts[0]
	if err := signing.CheckSignatureFrom(root); err != nil {
		return nil, fmt.Errorf("%s is not signed by %s: %w", SigningCertFile, RootCertFile, err)
	}
	if !publicKeysEqual(signing.PublicKey, key.Public()) {
		return nil, fmt.Errorf("%s does not match %s: the signing key and certificate belong to different CAs", SigningKeyFile, SigningCertFile)
	}
	s, err := local.NewSigner(key, signing, signer.DefaultSigAlgo(key), leafPolicy())
	if err != nil {
		return nil, fmt.Errorf("preparing the signing CA: %w", err)
	}
	return &CA{
		dir:         dir,
		root:        root,
		signing:     signing,
		signingKey:  key,
		signer:      s,
		CRLValidity: DefaultCRLValidity,
		now:         time.Now,
	}, nil
}

// leafPolicy is the cfssl signing policy of the signing CA: one profile per
// role with exactly the key usages the role needs. The CSR whitelist copies
// only the public key from a CSR; subject and SANs always come from the CA's
// own decision, whatever the CSR asked for.
func leafPolicy() *config.Signing {
	whitelist := &config.CSRWhitelist{PublicKey: true, PublicKeyAlgorithm: true, SignatureAlgorithm: true}
	client := func() *config.SigningProfile {
		return &config.SigningProfile{
			Usage:        []string{"digital signature", "client auth"},
			Expiry:       DefaultLeafTTL,
			ExpiryString: DefaultLeafTTL.String(),
			CSRWhitelist: whitelist,
		}
	}
	server := &config.SigningProfile{
		Usage:        []string{"digital signature", "server auth", "client auth"},
		Expiry:       DefaultLeafTTL,
		ExpiryString: DefaultLeafTTL.String(),
		CSRWhitelist: whitelist,
	}
	return &config.Signing{
		Default: client(),
		Profiles: map[string]*config.SigningProfile{
			string(RoleDirector):   server,
			string(RoleEnvoy):      client(),
			string(RoleResearcher): client(),
			string(RoleAdmin):      client(),
		},
	}
}

// Dir is the CA directory.
func (ca *CA) Dir() string { return ca.dir }

// Root is the federation root certificate.
func (ca *CA) Root() *x509.Certificate { return ca.root }

// Signing is the signing CA certificate that issues leaves and CRLs.
func (ca *CA) Signing() *x509.Certificate { return ca.signing }

// RootPEM is the root certificate in PEM, as parties store it in ca.crt.
func (ca *CA) RootPEM() []byte { return encodeCertificates(ca.root) }

// CRLPath is where the CA writes its CRL.
func (ca *CA) CRLPath() string { return filepath.Join(ca.dir, CRLFile) }

// IssueRequest says what certificate to issue.
type IssueRequest struct {
	// Role becomes the subject's OU and selects the key usages.
	Role Role
	// Name becomes the subject's CN. For SignCSR it may be empty to take
	// the CSR's CN (which is then validated like any name).
	Name string
	// Hosts are the DNS names and IP addresses a director is reached on
	// (its SANs). Only director certificates carry hosts; empty means the
	// name alone (IssueRequest) or the CSR's SANs, else the name (SignCSR).
	Hosts []string
	// TTL is the lifetime; zero means DefaultLeafTTL.
	TTL time.Duration
	// NotBefore and NotAfter, when set, replace the validity computed from
	// TTL. They exist so tests can make expired or not-yet-valid
	// certificates; operators use TTL.
	NotBefore, NotAfter time.Time
}

// Issued is a certificate the CA just issued.
type Issued struct {
	// Cert is the parsed leaf.
	Cert *x509.Certificate
	// Identity is what peers will see of the leaf.
	Identity Identity
	// ChainPEM is the leaf followed by the signing CA, as a party stores it
	// in NAME.crt and sends it in every handshake.
	ChainPEM []byte
	// KeyPEM is the private key when the CA made it (Issue); nil for
	// SignCSR, where the key never left the site.
	KeyPEM []byte
	// RootPEM is the federation root, stored by the party as ca.crt.
	RootPEM []byte
}

// Issue makes a key and a certificate for a party. The key is made here, so
// it has to be carried to the party; sites that must keep their key use
// NewCSR, SignCSR and ImportCertificate instead.
func (ca *CA) Issue(req IssueRequest) (*Issued, error) {
	if err := validateIssue(&req); err != nil {
		return nil, err
	}
	if req.Role == RoleDirector && len(req.Hosts) == 0 {
		if err := nameAsHost(req.Name); err != nil {
			return nil, err
		}
		req.Hosts = []string{req.Name}
	}
	csrPEM, keyPEM, err := csr.ParseRequest(&csr.CertificateRequest{
		CN:         req.Name,
		Names:      []csr.Name{{OU: string(req.Role)}},
		KeyRequest: leafKeyRequest(),
	})
	if err != nil {
		return nil, fmt.Errorf("making a key for %s %s: %w", req.Role, req.Name, err)
	}
	iss, err := ca.sign(csrPEM, req)
	if err != nil {
		return nil, err
	}
	iss.KeyPEM = keyPEM
	return iss, nil
}

// SignCSR issues a certificate for the public key in csrPEM. The CA decides
// the subject, SANs and key usages from req alone: the CSR contributes only
// its public key, its CN when req.Name is empty, and, for a director, its
// SANs when req.Hosts is empty. Whatever else the CSR asks for (another
// role in its OU, CA rights, extensions) is ignored.
func (ca *CA) SignCSR(csrPEM []byte, req IssueRequest) (*Issued, error) {
	block, _ := pem.Decode(csrPEM)
	if block == nil || (block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST") {
		return nil, errors.New("not a PEM certificate request (expected a CERTIFICATE REQUEST block, as `fx pki csr` writes)")
	}
	parsed, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing the certificate request: %w", err)
	}
	if err := parsed.CheckSignature(); err != nil {
		return nil, fmt.Errorf("the certificate request is not signed by its own key (corrupted or forged): %w", err)
	}
	if err := checkPublicKey(parsed.PublicKey); err != nil {
		return nil, err
	}
	if req.Name == "" {
		req.Name = parsed.Subject.CommonName
	}
	if err := validateIssue(&req); err != nil {
		return nil, err
	}
	if req.Role == RoleDirector && len(req.Hosts) == 0 {
		for _, d := range parsed.DNSNames {
			req.Hosts = append(req.Hosts, d)
		}
		for _, ip := range parsed.IPAddresses {
			req.Hosts = append(req.Hosts, ip.String())
		}
		for _, h := range req.Hosts {
			if err := ValidateHost(h); err != nil {
				return nil, fmt.Errorf("the certificate request asks for host %q: %w", h, err)
			}
		}
		if len(req.Hosts) == 0 {
			if err := nameAsHost(req.Name); err != nil {
				return nil, err
			}
			req.Hosts = []string{req.Name}
		}
	}
	return ca.sign(csrPEM, req)
}

// nameAsHost checks a director name that is to be its only SAN, because no
// host was given: clients can only dial it if it is a DNS name.
func nameAsHost(name string) error {
	if err := ValidateHost(name); err != nil {
		return fmt.Errorf("director %s has no hosts and its name is not a DNS name to use instead (%v): give the names and addresses it is reached on", name, err)
	}
	return nil
}

func validateIssue(req *IssueRequest) error {
	if !req.Role.Valid() {
		return fmt.Errorf("role %q is not a certificate role: use one of %s", req.Role, roleList(Roles()))
	}
	if err := ValidateName(req.Name); err != nil {
		return err
	}
	if req.Role != RoleDirector && len(req.Hosts) > 0 {
		return fmt.Errorf("hosts %v were given for %s %s: only director certificates carry hosts, because only the director (and its aggregators) accept connections", req.Hosts, req.Role, req.Name)
	}
	for _, h := range req.Hosts {
		if err := ValidateHost(h); err != nil {
			return err
		}
	}
	if req.TTL < 0 {
		return fmt.Errorf("lifetime %s is negative", req.TTL)
	}
	return nil
}

func checkPublicKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve.Params().BitSize < 256 {
			return fmt.Errorf("the certificate request's ECDSA key has %d bits: use P-256 or larger", k.Curve.Params().BitSize)
		}
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("the certificate request's RSA key has %d bits: use 2048 or more", k.N.BitLen())
		}
	case ed25519.PublicKey:
	default:
		return fmt.Errorf("the certificate request's key type %T is not supported: use ECDSA (as `fx pki csr` does), RSA or Ed25519", pub)
	}
	return nil
}

// sign issues the leaf for csrPEM under the already validated req.
func (ca *CA) sign(csrPEM []byte, req IssueRequest) (*Issued, error) {
	now := ca.now()
	notBefore, notAfter := req.NotBefore, req.NotAfter
	if notBefore.IsZero() {
		notBefore = now.Add(-backdate)
		if !notAfter.IsZero() && !notAfter.After(notBefore) {
			notBefore = notAfter.Add(-time.Hour)
		}
	}
	if notAfter.IsZero() {
		ttl := req.TTL
		if ttl == 0 {
			ttl = DefaultLeafTTL
		}
		notAfter = now.Add(ttl)
	}
	if !notAfter.After(notBefore) {
		return nil, fmt.Errorf("certificate would expire (%s) before it becomes valid (%s)", notAfter.Format(time.RFC3339), notBefore.Format(time.RFC3339))
	}
	if notAfter.After(ca.signing.NotAfter) {
		return nil, fmt.Errorf("certificate would expire %s, after the signing CA itself (%s): choose a shorter --ttl", notAfter.Format(time.RFC3339), ca.signing.NotAfter.Format(time.RFC3339))
	}
	hosts := req.Hosts
	if hosts == nil {
		// A non-nil empty list makes cfssl clear any SAN, so a client
		// certificate carries none.
		hosts = []string{}
	}
	var org string
	if len(ca.signing.Subject.Organization) > 0 {
		org = ca.signing.Subject.Organization[0]
	}
	certPEM, err := ca.signer.Sign(signer.SignRequest{
		Request: string(csrPEM),
		Profile: string(req.Role),
		Hosts:   hosts,
		Subject: &signer.Subject{
			CN:    req.Name,
			Names: []csr.Name{{O: org, OU: string(req.Role)}},
		},
		NotBefore: notBefore,
		NotAfter:  notAfter,
	})
	if err != nil {
		return nil, fmt.Errorf("signing the certificate for %s %s: %w", req.Role, req.Name, err)
	}
	leaf, err := helpers.ParseCertificatePEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("reading back the certificate for %s %s: %w", req.Role, req.Name, err)
	}
	id, err := IdentityFromCertificate(leaf)
	if err != nil {
		return nil, fmt.Errorf("the issued certificate has no fx identity: %w", err)
	}
	record := filepath.Join(ca.dir, IssuedDir, id.Serial+".crt")
	if err := os.MkdirAll(filepath.Dir(record), 0o700); err != nil {
		return nil, fmt.Errorf("recording the issued certificate: %w", err)
	}
	if err := writeFileAtomic(record, certPEM, 0o644); err != nil {
		return nil, fmt.Errorf("recording the issued certificate: %w", err)
	}
	return &Issued{
		Cert:     leaf,
		Identity: id,
		ChainPEM: encodeCertificates(leaf, ca.signing),
		RootPEM:  ca.RootPEM(),
	}, nil
}

// WriteFiles stores an issued certificate for the party in dir, in the layout
// of PartyFiles: NAME.crt (leaf and signing CA), NAME.key (mode 0600, only
// when the CA made the key) and ca.crt (the root). It refuses, writing
// nothing, when NAME.key already exists or ca.crt holds another root.
func (iss *Issued) WriteFiles(dir string) (Files, error) {
	files := PartyFiles(dir, iss.Identity.Name)
	if err := checkRootFile(files.CA, iss.RootPEM); err != nil {
		return Files{}, err
	}
	if iss.KeyPEM != nil {
		if err := writeKeyFile(files.Key, iss.KeyPEM); err != nil {
			return Files{}, err
		}
	}
	if err := writeRootFile(files.CA, iss.RootPEM); err != nil {
		return Files{}, err
	}
	if err := writeFileAtomic(files.Cert, iss.ChainPEM, 0o644); err != nil {
		return Files{}, err
	}
	return files, nil
}

// IssueTo issues a certificate with a new key like Issue and writes it to dir
// like WriteFiles, but checks first that the files can be written (no
// NAME.key there, no other root in ca.crt), so that a refusal leaves no
// certificate on the CA's record that nobody holds.
func (ca *CA) IssueTo(dir string, req IssueRequest) (*Issued, Files, error) {
	if err := ValidateName(req.Name); err != nil {
		return nil, Files{}, err
	}
	files := PartyFiles(dir, req.Name)
	if exists, err := fileExists(files.Key); err != nil || exists {
		if err == nil {
			err = fmt.Errorf("%s already exists: fx never overwrites a private key; move it away first, or renew with a CSR for the existing key (fx pki csr, fx pki sign): %w", files.Key, ErrExists)
		}
		return nil, Files{}, err
	}
	if err := checkRootFile(files.CA, ca.RootPEM()); err != nil {
		return nil, Files{}, err
	}
	iss, err := ca.Issue(req)
	if err != nil {
		return nil, Files{}, err
	}
	files, err = iss.WriteFiles(dir)
	return iss, files, err
}

// SignCSRTo signs like SignCSR and writes NAME.crt and ca.crt to dir like
// WriteFiles, checking first that ca.crt there does not hold another root.
func (ca *CA) SignCSRTo(dir string, csrPEM []byte, req IssueRequest) (*Issued, Files, error) {
	if err := checkRootFile(PartyFiles(dir, "").CA, ca.RootPEM()); err != nil {
		return nil, Files{}, err
	}
	iss, err := ca.SignCSR(csrPEM, req)
	if err != nil {
		return nil, Files{}, err
	}
	files, err := iss.WriteFiles(dir)
	return iss, files, err
}

// IssuedCertificate is one entry of the CA's record of what it issued.
type IssuedCertificate struct {
	Identity
	Hosts     []string
	NotBefore time.Time
	// Revoked is set when the certificate is in the revocation list.
	Revoked   bool
	RevokedAt time.Time
}

// List returns every certificate the CA issued, with its revocation status,
// ordered by role, name and issue time.
func (ca *CA) List() ([]IssuedCertificate, error) {
	certs, err := ca.issued()
	if err != nil {
		return nil, err
	}
	state, err := ca.readRevoked()
	if err != nil {
		return nil, err
	}
	revoked := make(map[string]time.Time, len(state.Revoked))
	for _, r := range state.Revoked {
		revoked[r.Serial] = r.RevokedAt
	}
	out := make([]IssuedCertificate, 0, len(certs))
	for _, c := range certs {
		id, err := IdentityFromCertificate(c)
		if err != nil {
			continue
		}
		at, isRevoked := revoked[id.Serial]
		out = append(out, IssuedCertificate{
			Identity:  id,
			Hosts:     certificateHosts(c),
			NotBefore: c.NotBefore,
			Revoked:   isRevoked,
			RevokedAt: at,
		})
	}
	rank := func(r Role) int { return slices.Index(Roles(), r) }
	sort.SliceStable(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Role != b.Role {
			return rank(a.Role) < rank(b.Role)
		}
		if a.Name != b.Name {
			return a.Name < b.Name
		}
		return a.NotBefore.Before(b.NotBefore)
	})
	return out, nil
}

// issued reads the certificates in the issued directory, oldest first.
func (ca *CA) issued() ([]*x509.Certificate, error) {
	dir := filepath.Join(ca.dir, IssuedDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("reading the record of issued certificates: %w", err)
	}
	var certs []*x509.Certificate
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".crt") {
			continue
		}
		cs, err := readCertificates(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("reading the record of issued certificates: %w", err)
		}
		certs = append(certs, cs[0])
	}
	sort.SliceStable(certs, func(i, j int) bool { return certs[i].NotBefore.Before(certs[j].NotBefore) })
	return certs, nil
}

// certificateHosts lists a certificate's DNS and IP SANs.
func certificateHosts(c *x509.Certificate) []string {
	hosts := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		hosts = append(hosts, ip.String())
	}
	return hosts
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	ea, ok := a.(equaler)
	return ok && ea.Equal(b)
}
