package pki

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// DefaultCheckInterval bounds how often a Keyring stats its files: a
// handshake or call that comes sooner reuses what is loaded.
const DefaultCheckInterval = time.Second

// KeyringConfig says where a party's TLS material lives.
type KeyringConfig struct {
	Files
	// CheckInterval is the least time between two looks at the files'
	// size and modification time. Zero means DefaultCheckInterval; a
	// negative value looks on every use (for tests).
	CheckInterval time.Duration
	// Logger receives reloads, failed reloads and refused peers. Optional.
	Logger hclog.Logger
}

// Keyring holds a party's certificate and key, the federation root(s) and
// the CRL, and reloads them when their files change, so that renewing a
// certificate, moving to a new root or publishing a CRL needs no restart.
// Files are looked at during handshakes and calls, at most once per
// CheckInterval; a set of files that does not load (a key that no longer
// matches its certificate while both are being replaced, a CRL with a bad
// signature, a CRL older than the one in force) is logged and the previous
// material stays in use.
type Keyring struct {
	cfg KeyringConfig
	log hclog.Logger

	mu        sync.Mutex // serialises looks at the files
	lastCheck time.Time
	stamps    []fileStamp
	lastErr   error

	cur atomic.Pointer[material]
}

// material is one consistent load of the files.
type material struct {
	cert     tls.Certificate
	leaf     *x509.Certificate
	identity Identity
	roots    *x509.CertPool
	crl      *crlInfo
	server   *tls.Config
}

// crlInfo is a CRL whose signature was verified against issuer.
type crlInfo struct {
	issuer     *x509.Certificate
	number     *big.Int             // the CRL number; zero when the CRL has none
	revoked    map[string]time.Time // FormatSerial → revocation time
	nextUpdate time.Time
}

// errOlderCRL is wrapped by a load refused because its CRL is older than
// the one in force.
var errOlderCRL = errors.New("older than the CRL in force")

type fileStamp struct {
	exists bool
	id     uint64
	size   int64
	mod    time.Time
}

// NewKeyring loads the files and fails with a message naming the file at
// fault when they are missing, do not match or do not chain to the root.
func NewKeyring(cfg KeyringConfig) (*Keyring, error) {
	switch {
	case cfg.Cert == "":
		return nil, errors.New("no certificate file given")
	case cfg.Key == "":
		return nil, errors.New("no key file given")
	case cfg.CA == "":
		return nil, errors.New("no CA (federation root) file given")
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	k := &Keyring{cfg: cfg, log: log}
	k.stamps = k.stat()
	m, err := k.load()
	if err != nil {
		return nil, err
	}
	k.cur.Store(m)
	k.lastCheck = time.Now()
	return k, nil
}

// Identity is the party's own identity, from its current certificate.
func (k *Keyring) Identity() Identity { return k.current().identity }

// Certificate is the party's current leaf certificate.
func (k *Keyring) Certificate() *x509.Certificate { return k.current().leaf }

// Reload loads the files now, whatever their modification times, and
// returns why they could not be loaded (the previous material then stays in
// use). Useful on SIGHUP.
func (k *Keyring) Reload() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.lastCheck = time.Now()
	k.stamps = k.stat()
	return k.reloadLocked()
}

// current returns the loaded material after looking for changed files.
func (k *Keyring) current() *material {
	k.refresh()
	return k.cur.Load()
}

func (k *Keyring) refresh() {
	interval := k.cfg.CheckInterval
	if interval == 0 {
		interval = DefaultCheckInterval
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	now := time.Now()
	if interval > 0 && now.Sub(k.lastCheck) < interval {
		return
	}
	k.lastCheck = now
	stamps := k.stat()
	if equalStamps(stamps, k.stamps) {
		return
	}
	// The new stamps are remembered even when the load fails: the files are
	// tried again as soon as one of them changes again (the second half of a
	// certificate-and-key replacement), not parsed every second meanwhile.
	k.stamps = stamps
	_ = k.reloadLocked()
}

func (k *Keyring) reloadLocked() error {
	m, err := k.load()
	if err != nil {
		switch {
		case errors.Is(err, errOlderCRL):
			// Not a file caught half-replaced but a revocation being
			// undone: whoever replaced the CRL must hear of it.
			k.log.Error("REFUSED AN OLDER CRL: revoked certificates stay revoked; find out who replaced the CRL file and copy the CA's current crl.pem there", "error", err)
		case k.lastErr == nil || k.lastErr.Error() != err.Error():
			k.log.Warn("keeping the previous certificates: the files on disk do not load", "error", err)
		}
		k.lastErr = err
		return err
	}
	old := k.cur.Load()
	k.cur.Store(m)
	k.lastErr = nil
	if old != nil {
		k.log.Info("reloaded certificates", "identity", m.identity.String(), "not_after", m.identity.NotAfter, "crl", m.crl != nil)
	}
	return nil
}

func (k *Keyring) paths() []string {
	return []string{k.cfg.Cert, k.cfg.Key, k.cfg.CA, k.cfg.CRL}
}

func (k *Keyring) stat() []fileStamp {
	paths := k.paths()
	out := make([]fileStamp, len(paths))
	for i, p := range paths {
		if p == "" {
			continue
		}
		// Stat follows symbolic links, so a secret mounted through a link
		// that is swapped to a new target counts as a change.
		if fi, err := os.Stat(p); err == nil {
			out[i] = fileStamp{exists: true, id: fileID(fi), size: fi.Size(), mod: fi.ModTime()}
		}
	}
	return out
}

func equalStamps(a, b []fileStamp) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].exists != b[i].exists || a[i].id != b[i].id || a[i].size != b[i].size || !a[i].mod.Equal(b[i].mod) {
			return false
		}
	}
	return true
}

// load reads and checks every file into a new material.
func (k *Keyring) load() (*material, error) {
	cfg := k.cfg
	pair, err := tls.LoadX509KeyPair(cfg.Cert, cfg.Key)
	if err != nil {
		return nil, fmt.Errorf("loading certificate %s with key %s: %w", cfg.Cert, cfg.Key, err)
	}
	chain := make([]*x509.Certificate, len(pair.Certificate))
	for i, der := range pair.Certificate {
		if chain[i], err = x509.ParseCertificate(der); err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %w", cfg.Cert, i+1, err)
		}
	}
	leaf := chain[0]
	pair.Leaf = leaf
	id, err := IdentityFromCertificate(leaf)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", cfg.Cert, err)
	}
	rootCerts, err := readCertificates(cfg.CA)
	if err != nil {
		return nil, fmt.Errorf("reading the federation root: %w", err)
	}
	now := time.Now()
	if now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("certificate %s for %s expired at %s: ask the federation's CA for a new one", cfg.Cert, id, leaf.NotAfter.Format(time.RFC3339))
	}
	if now.Before(leaf.NotBefore) {
		return nil, fmt.Errorf("certificate %s for %s is not valid before %s: check this machine's clock", cfg.Cert, id, leaf.NotBefore.Format(time.RFC3339))
	}
	if err := VerifyChain(chain, rootCerts, now); err != nil {
		if errors.Is(err, errSignedByRoot) {
			return nil, fmt.Errorf("%s: %w", cfg.Cert, err)
		}
		if len(chain) == 1 {
			return nil, fmt.Errorf("%s holds only the leaf certificate: it must be followed by the signing CA certificate, as `fx pki certify` writes it, or peers cannot verify it: %w", cfg.Cert, err)
		}
		return nil, fmt.Errorf("certificate %s does not chain to the federation root in %s: %w", cfg.Cert, cfg.CA, err)
	}
	roots := x509.NewCertPool()
	for _, r := range rootCerts {
		roots.AddCert(r)
	}
	m := &material{cert: pair, leaf: leaf, identity: id, roots: roots}
	if cfg.CRL != "" {
		m.crl, err = loadCRL(cfg.CRL, append(chain[1:], rootCerts...), now)
		if err != nil {
			return nil, err
		}
		if err := notOlderCRL(m.crl, k.cur.Load(), cfg.CRL); err != nil {
			return nil, err
		}
		if now.After(m.crl.nextUpdate) {
			k.log.Warn("the CRL is past its next update: it still applies, but re-issue it with `fx pki crl` and copy it here", "crl", cfg.CRL, "next_update", m.crl.nextUpdate)
		}
	}
	m.server = k.serverSnapshot(m)
	return m, nil
}

// loadCRL reads the CRL at path and verifies its signature against the
// first candidate whose subject is the CRL's issuer.
func loadCRL(path string, candidates []*x509.Certificate, now time.Time) (*crlInfo, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the CRL: %w", err)
	}
	crl, err := ParseCRL(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var issuer *x509.Certificate
	for _, c := range candidates {
		if bytes.Equal(crl.RawIssuer, c.RawSubject) && crl.CheckSignatureFrom(c) == nil {
			issuer = c
			break
		}
	}
	if issuer == nil {
		return nil, fmt.Errorf("CRL %s (issuer %q) is not signed by the signing CA of this party's certificate nor by a federation root: copy the crl.pem of this federation's CA", path, crl.Issuer.String())
	}
	info := &crlInfo{issuer: issuer, number: new(big.Int), revoked: make(map[string]time.Time, len(crl.RevokedCertificateEntries)), nextUpdate: crl.NextUpdate}
	if crl.Number != nil {
		info.number = crl.Number
	}
	for _, e := range crl.RevokedCertificateEntries {
		info.revoked[FormatSerial(e.SerialNumber)] = e.RevocationTime
	}
	return info, nil
}

// notOlderCRL refuses crl, read from path, when the material in force holds
// a CRL of the same signing CA with a higher number. The CA numbers its CRLs
// in order (RFC 5280's CRL number), and an older one lacks later
// revocations: taking it would make revoked certificates valid again. A CRL
// of another signing CA (after moving to a new CA) is not comparable and is
// taken. A restart reads the CRL on disk afresh, whatever its number.
func notOlderCRL(crl *crlInfo, inForce *material, path string) error {
	if inForce == nil || inForce.crl == nil {
		return nil
	}
	cur := inForce.crl
	if !bytes.Equal(crl.issuer.RawSubject, cur.issuer.RawSubject) || !bytes.Equal(crl.issuer.RawSubjectPublicKeyInfo, cur.issuer.RawSubjectPublicKeyInfo) {
		return nil
	}
	if crl.number.Cmp(cur.number) >= 0 {
		return nil
	}
	return fmt.Errorf("CRL %s is number %s, %w (number %s), and may lack revocations made since: keeping the CRL in force; copy the CA's current crl.pem (`fx pki crl --dir CA` re-issues it with a new number)", path, crl.number, errOlderCRL, cur.number)
}

// Revocation reports whether a certificate of a verified chain (leaf first)
// is in the current CRL. It implements RevocationChecker.
func (k *Keyring) Revocation(chain []*x509.Certificate) (revokedAt time.Time, revoked bool) {
	return k.current().crl.check(chain)
}

func (c *crlInfo) check(chain []*x509.Certificate) (time.Time, bool) {
	if c == nil {
		return time.Time{}, false
	}
	for i := 0; i+1 < len(chain); i++ {
		parent := chain[i+1]
		if !bytes.Equal(parent.RawSubject, c.issuer.RawSubject) || !bytes.Equal(parent.RawSubjectPublicKeyInfo, c.issuer.RawSubjectPublicKeyInfo) {
			continue
		}
		if at, ok := c.revoked[FormatSerial(chain[i].SerialNumber)]; ok {
			return at, true
		}
	}
	return time.Time{}, false
}

// ServerConfig returns a TLS configuration for a server (the director and its
// aggregators): TLS 1.3 only, a client certificate required and verified
// against the current federation root (intermediates taken from the
// client's chain), the client refused when its certificate carries no fx
// identity or is in the current CRL. Each handshake uses the material
// current at that moment.
func (k *Keyring) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return k.current().server, nil
		},
	}
}

func (k *Keyring) serverSnapshot(m *material) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{m.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    m.roots,
		// A resumed session would skip the certificate checks; fx's
		// connections are long-lived, so full handshakes cost nothing that
		// matters.
		SessionTicketsDisabled: true,
		VerifyConnection:       k.verifyClient,
	}
}

func (k *Keyring) verifyClient(cs tls.ConnectionState) error {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return errors.New("fx: client certificate was not verified against the federation root")
	}
	chain := cs.VerifiedChains[0]
	id, err := IdentityFromCertificate(chain[0])
	if err != nil {
		k.log.Warn("refused a client certificate without an fx identity", "subject", chain[0].Subject.String(), "error", err)
		return fmt.Errorf("fx: %w", err)
	}
	if err := issuedBySigningCA(cs.VerifiedChains); err != nil {
		k.log.Warn("refused a client certificate not issued by the signing CA", "identity", id.String(), "error", err)
		return fmt.Errorf("fx: %w", err)
	}
	if at, revoked := k.Revocation(chain); revoked {
		k.log.Warn("refused a revoked client certificate", "identity", id.String(), "revoked_at", at)
		return fmt.Errorf("fx: certificate for %s was revoked at %s", id, at.Format(time.RFC3339))
	}
	return nil
}

// ClientConfig returns a TLS configuration for dialing the director or an
// aggregator: TLS 1.3 only, this party's current certificate with its
// intermediate, the server's certificate verified against the current
// federation root, for server use, for serverName (a DNS name or IP address
// among the server's SANs) and against the CRL. With an empty serverName the
// ServerName later set on the returned config is checked (DNS names only);
// gRPC clients should use TransportCredentials or DialOptions, which take the
// host of the dial target.
func (k *Keyring) ClientConfig(serverName string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: serverName,
		// The standard verification reads RootCAs once per Config, which
		// would pin the root loaded at start; VerifyConnection performs the
		// same verification (chain, usage, host name) against the root
		// current at each handshake instead.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			// The connection state omits a server name that is an IP
			// address (it is not sent as SNI), so the configured one wins.
			name := serverName
			if name == "" {
				name = cs.ServerName
			}
			return k.verifyServer(cs, name)
		},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &k.current().cert, nil
		},
	}
}

func (k *Keyring) verifyServer(cs tls.ConnectionState, serverName string) error {
	m := k.current()
	if len(cs.PeerCertificates) == 0 {
		return errors.New("fx: the server sent no certificate")
	}
	if serverName == "" {
		return errors.New("fx: no server name to check the server's certificate against: dial the director by the DNS name or address its certificate lists")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	chains, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
		Roots:         m.roots,
		Intermediates: inter,
		DNSName:       serverName,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err == nil {
		err = issuedBySigningCA(chains)
	}
	if err != nil {
		return fmt.Errorf("fx: the server's certificate is not valid for %s in this federation: %w", serverName, err)
	}
	if at, revoked := m.crl.check(chains[0]); revoked {
		return fmt.Errorf("fx: the server's certificate (serial %s) was revoked at %s", FormatSerial(chains[0][0].SerialNumber), at.Format(time.RFC3339))
	}
	return nil
}
