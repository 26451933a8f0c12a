package pki

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cloudflare/cfssl/helpers"
)

// Files names the files a party needs to take part in the federation.
type Files struct {
	// Cert is the party's certificate followed by the signing CA's
	// certificate (PEM). Peers verify only against the root, so the
	// intermediate must travel with the leaf in every handshake.
	Cert string
	// Key is the party's private key (PEM, mode 0600).
	Key string
	// CA holds the federation root certificate(s) (PEM). More than one root
	// may be listed while a federation moves to a new root.
	CA string
	// CRL is the signing CA's certificate revocation list (PEM or DER).
	// Optional; servers should set it so that revoked parties are refused.
	CRL string
}

// PartyFiles returns the file names that `fx pki certify`, `fx pki csr`,
// `fx pki sign` and `fx pki import` use for the party called name in dir:
// dir/name.crt, dir/name.key and dir/ca.crt. CRL is left empty.
func PartyFiles(dir, name string) Files {
	return Files{
		Cert: filepath.Join(dir, name+".crt"),
		Key:  filepath.Join(dir, name+".key"),
		CA:   filepath.Join(dir, "ca.crt"),
	}
}

// ErrExists is wrapped by errors that refuse to replace a file fx never
// overwrites (private keys, a CA, a different root).
var ErrExists = fs.ErrExist

// writeKeyFile creates path with mode 0600 holding data and refuses if the
// file already exists: a private key that is replaced cannot be recovered,
// and every certificate issued for it would silently stop working.
func writeKeyFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("creating the directory for %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s already exists: fx never overwrites a private key; move it away first if you really mean to replace it: %w", path, ErrExists)
		}
		return fmt.Errorf("creating key file %s: %w", path, err)
	}
	// The umask could have removed bits but never adds any; Chmod makes the
	// mode exactly 0600 whatever the umask was.
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("setting mode 0600 on %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("writing key file %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("syncing key file %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return fmt.Errorf("closing key file %s: %w", path, err)
	}
	return nil
}

// writeFileAtomic replaces path with data through a temporary file and a
// rename, so that a Keyring watching the file never reads half of it.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating the directory for %s: %w", path, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	fail := func(step string, err error) error {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("%s %s: %w", step, path, err)
	}
	if err := f.Chmod(perm); err != nil {
		return fail("setting the mode of", err)
	}
	if _, err := f.Write(data); err != nil {
		return fail("writing", err)
	}
	if err := f.Sync(); err != nil {
		return fail("syncing", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("closing %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("replacing %s: %w", path, err)
	}
	return nil
}

// writeRootFile writes the federation root to path unless the file already
// holds that root (alone or in a bundle). A different root is refused: replacing it would
// silently make the party distrust everyone it talks to today.
func writeRootFile(path string, rootPEM []byte) error {
	old, err := os.ReadFile(path)
	switch {
	case err == nil:
		if containsCertificates(old, rootPEM) {
			return nil
		}
		return fmt.Errorf("%s already holds a different root certificate: it would be replaced by the root of this CA; remove it first if this party is moving to a new federation: %w", path, ErrExists)
	case errors.Is(err, fs.ErrNotExist):
		return writeFileAtomic(path, rootPEM, 0o644)
	default:
		return fmt.Errorf("reading %s: %w", path, err)
	}
}

// checkRootFile reports up front whether writeRootFile would refuse, so that
// nothing is written when the whole operation cannot complete.
func checkRootFile(path string, rootPEM []byte) error {
	old, err := os.ReadFile(path)
	if err == nil && !containsCertificates(old, rootPEM) {
		return fmt.Errorf("%s already holds a different root certificate: it would be replaced by the root of this CA; remove it first if this party is moving to a new federation: %w", path, ErrExists)
	}
	return nil
}

// containsCertificates reports whether every certificate of want is in
// have: a ca.crt that bundles the old and the new root during a root
// rotation already trusts the new one and is kept as it is.
func containsCertificates(have, want []byte) bool {
	hc, errH := ParseCertificatesPEM(have)
	wc, errW := ParseCertificatesPEM(want)
	if errH != nil || errW != nil {
		return false
	}
	for _, w := range wc {
		found := false
		for _, h := range hc {
			if bytes.Equal(h.Raw, w.Raw) {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// ParseCertificatesPEM returns every CERTIFICATE block of data, in order,
// skipping other blocks; data without one is an error.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block found")
	}
	return certs, nil
}

// readCertificates reads a PEM file of one or more certificates.
func readCertificates(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading certificates: %w", err)
	}
	certs, err := ParseCertificatesPEM(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs, nil
}

// readPrivateKey reads a PEM private key (EC, PKCS#1 or PKCS#8).
func readPrivateKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading private key: %w", err)
	}
	key, err := helpers.ParsePrivateKeyPEM(data)
	if err != nil {
		return nil, fmt.Errorf("%s is not a PEM private key: %w", path, err)
	}
	return key, nil
}

func encodeCertificates(certs ...*x509.Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return buf.Bytes()
}

func fileExists(path string) (bool, error) {
	_, err := os.Lstat(path)
	if err == nil {
		return true, nil
	}
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return false, err
}
