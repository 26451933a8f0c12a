package pki

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"sort"
	"time"
)

// ErrAlreadyRevoked is wrapped by Revoke when the serial was revoked before;
// the CRL is rewritten all the same.
var ErrAlreadyRevoked = errors.New("already revoked")

// Revocation records one revoked certificate.
type Revocation struct {
	Serial    string    `json:"serial"`
	Name      string    `json:"name"`
	Role      Role      `json:"role"`
	NotAfter  time.Time `json:"not_after"`
	RevokedAt time.Time `json:"revoked_at"`
}

// revokedState is the content of revoked.json.
type revokedState struct {
	// CRLNumber is the number of the last CRL written; RFC 5280 wants it to
	// grow with every CRL so relying parties can tell newer from older.
	CRLNumber int64        `json:"crl_number"`
	Revoked   []Revocation `json:"revoked"`
}

func (ca *CA) readRevoked() (revokedState, error) {
	var st revokedState
	path := filepath.Join(ca.dir, RevokedFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("reading the revocation list: %w", err)
	}
	if err := json.Unmarshal(data, &st); err != nil {
		return st, fmt.Errorf("%s is not a valid revocation list (fix or restore it before revoking more): %w", path, err)
	}
	return st, nil
}

func (ca *CA) writeRevoked(st revokedState) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the revocation list: %w", err)
	}
	return writeFileAtomic(filepath.Join(ca.dir, RevokedFile), append(data, '\n'), 0o644)
}

// Revocations returns every revoked certificate, oldest revocation first.
func (ca *CA) Revocations() ([]Revocation, error) {
	st, err := ca.readRevoked()
	return st.Revoked, err
}

// Revoke adds the certificate with serial to the revocation list and
// rewrites the CRL. The serial must be one this CA issued. Revoking it again
// rewrites the CRL and returns the first revocation wrapped with
// ErrAlreadyRevoked.
func (ca *CA) Revoke(serial *big.Int) (Revocation, error) {
	unlock, err := lockDir(ca.dir)
	if err != nil {
		return Revocation{}, err
	}
	defer unlock()
	want := FormatSerial(serial)
	st, err := ca.readRevoked()
	if err != nil {
		return Revocation{}, err
	}
	for _, r := range st.Revoked {
		if r.Serial == want {
			if _, _, err := ca.writeCRLLocked(st, ca.CRLValidity); err != nil {
				return r, err
			}
			return r, fmt.Errorf("certificate %s (%s %s) was revoked at %s: %w", r.Serial, r.Role, r.Name, r.RevokedAt.Format(time.RFC3339), ErrAlreadyRevoked)
		}
	}
	certs, err := ca.issued()
	if err != nil {
		return Revocation{}, err
	}
	for _, c := range certs {
		if c.SerialNumber.Cmp(serial) != 0 {
			continue
		}
		rev, err := ca.revokeLocked(&st, c)
		if err != nil {
			return Revocation{}, err
		}
		return rev, nil
	}
	return Revocation{}, fmt.Errorf("no certificate with serial %s was issued by the CA in %s (see `fx pki list --dir %s`)", want, ca.dir, ca.dir)
}

// RevokeName revokes every certificate issued to name that is neither
// revoked nor expired, and rewrites the CRL. It is what an operator wants
// when a site leaves the federation or a key is lost.
func (ca *CA) RevokeName(name string) ([]Revocation, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	unlock, err := lockDir(ca.dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st, err := ca.readRevoked()
	if err != nil {
		return nil, err
	}
	revoked := make(map[string]bool, len(st.Revoked))
	for _, r := range st.Revoked {
		revoked[r.Serial] = true
	}
	certs, err := ca.issued()
	if err != nil {
		return nil, err
	}
	now := ca.now()
	var targets []*x509.Certificate
	seen := 0
	for _, c := range certs {
		if c.Subject.CommonName != name {
			continue
		}
		seen++
		if revoked[FormatSerial(c.SerialNumber)] || now.After(c.NotAfter) {
			continue
		}
		targets = append(targets, c)
	}
	if len(targets) == 0 {
		if seen == 0 {
			return nil, fmt.Errorf("no certificate named %s was issued by the CA in %s (see `fx pki list --dir %s`)", name, ca.dir, ca.dir)
		}
		return nil, fmt.Errorf("every certificate named %s is already revoked or expired: %w", name, ErrAlreadyRevoked)
	}
	var out []Revocation
	for _, c := range targets {
		r := Revocation{Serial: FormatSerial(c.SerialNumber), Name: c.Subject.CommonName, NotAfter: c.NotAfter, RevokedAt: now.UTC()}
		if id, err := IdentityFromCertificate(c); err == nil {
			r.Role = id.Role
		}
		st.Revoked = append(st.Revoked, r)
		out = append(out, r)
	}
	if err := ca.writeRevoked(st); err != nil {
		return nil, err
	}
	if _, _, err := ca.writeCRLLocked(st, ca.CRLValidity); err != nil {
		return out, err
	}
	return out, nil
}

func (ca *CA) revokeLocked(st *revokedState, c *x509.Certificate) (Revocation, error) {
	r := Revocation{
		Serial:    FormatSerial(c.SerialNumber),
		Name:      c.Subject.CommonName,
		NotAfter:  c.NotAfter,
		RevokedAt: ca.now().UTC(),
	}
	if id, err := IdentityFromCertificate(c); err == nil {
		r.Role = id.Role
	}
	st.Revoked = append(st.Revoked, r)
	if err := ca.writeRevoked(*st); err != nil {
		return Revocation{}, err
	}
	if _, _, err := ca.writeCRLLocked(*st, ca.CRLValidity); err != nil {
		return r, err
	}
	return r, nil
}

// WriteCRL re-issues the CRL from the revocation list with a next-update
// time validity from now, and returns its path. Run it (`fx pki crl`) before
// the previous CRL's next update, or after restoring the CA directory.
func (ca *CA) WriteCRL(validity time.Duration) (path string, nextUpdate time.Time, err error) {
	unlock, err := lockDir(ca.dir)
	if err != nil {
		return "", time.Time{}, err
	}
	defer unlock()
	st, err := ca.readRevoked()
	if err != nil {
		return "", time.Time{}, err
	}
	return ca.writeCRLLocked(st, validity)
}

// writeCRLLocked signs and writes the CRL with the signing CA. It uses the
// standard library's RFC 5280 v2 CRL (with a CRL number and the authority
// key id) rather than cfssl's crl package, whose CreateGenericCRL still
// emits the deprecated v1 form. Revoked certificates that have expired are
// left out: expiry already refuses them.
func (ca *CA) writeCRLLocked(st revokedState, validity time.Duration) (string, time.Time, error) {
	if validity <= 0 {
		validity = DefaultCRLValidity
	}
	now := ca.now()
	st.CRLNumber++
	list := &x509.RevocationList{
		Number:     big.NewInt(st.CRLNumber),
		ThisUpdate: now.Add(-backdate),
		NextUpdate: now.Add(validity),
	}
	sort.SliceStable(st.Revoked, func(i, j int) bool { return st.Revoked[i].RevokedAt.Before(st.Revoked[j].RevokedAt) })
	for _, r := range st.Revoked {
		if now.After(r.NotAfter) {
			continue
		}
		serial, err := ParseSerial(r.Serial)
		if err != nil {
			return "", time.Time{}, fmt.Errorf("%s: %w", RevokedFile, err)
		}
		list.RevokedCertificateEntries = append(list.RevokedCertificateEntries, x509.RevocationListEntry{
			SerialNumber:   serial,
			RevocationTime: r.RevokedAt,
		})
	}
	der, err := x509.CreateRevocationList(rand.Reader, list, ca.signing, ca.signingKey)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("signing the CRL: %w", err)
	}
	path := ca.CRLPath()
	if err := writeFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o644); err != nil {
		return "", time.Time{}, err
	}
	if err := ca.writeRevoked(st); err != nil {
		return "", time.Time{}, err
	}
	return path, list.NextUpdate, nil
}

// ParseCRL reads a CRL in PEM ("X509 CRL") or DER form.
func ParseCRL(data []byte) (*x509.RevocationList, error) {
	if block, _ := pem.Decode(data); block != nil {
		if block.Type != "X509 CRL" {
			return nil, fmt.Errorf("PEM block is %q, not an X509 CRL", block.Type)
		}
		data = block.Bytes
	}
	crl, err := x509.ParseRevocationList(data)
	if err != nil {
		return nil, fmt.Errorf("parsing the CRL: %w", err)
	}
	return crl, nil
}
