package pki

import (
	"context"
	"crypto/x509"
	"fmt"
	"time"
)

// Identity is who a caller is, as proven by its verified client certificate.
// Services read it with IdentityFromContext; nothing in a request can change
// it.
type Identity struct {
	// Name is the certificate's CN: the envoy, researcher, admin or director
	// name.
	Name string
	// Role is the certificate's OU.
	Role Role
	// Serial is the certificate's serial number as FormatSerial writes it.
	Serial string
	// NotAfter is when the certificate expires.
	NotAfter time.Time
}

// String describes the identity for logs and error messages, e.g.
// "envoy site-1 (serial 3A9F...)".
func (id Identity) String() string {
	return fmt.Sprintf("%s %s (serial %s)", id.Role, id.Name, id.Serial)
}

// IdentityFromCertificate reads the fx identity of a certificate: its CN must
// be a valid name and its OU exactly one certificate role. It does not verify
// the certificate; callers pass a leaf from a verified chain.
func IdentityFromCertificate(cert *x509.Certificate) (Identity, error) {
	if cert == nil {
		return Identity{}, fmt.Errorf("no certificate")
	}
	if err := ValidateName(cert.Subject.CommonName); err != nil {
		return Identity{}, fmt.Errorf("certificate CN is not an fx name: %w", err)
	}
	var role Role
	for _, ou := range cert.Subject.OrganizationalUnit {
		r := Role(ou)
		if !r.Valid() {
			continue
		}
		if role != "" && role != r {
			return Identity{}, fmt.Errorf("certificate for %s carries two roles in its OU (%s and %s)", cert.Subject.CommonName, role, r)
		}
		role = r
	}
	if role == "" {
		return Identity{}, fmt.Errorf("certificate for %s has no fx role in its OU %q: expected one of %s", cert.Subject.CommonName, cert.Subject.OrganizationalUnit, roleList(Roles()))
	}
	return Identity{
		Name:     cert.Subject.CommonName,
		Role:     role,
		Serial:   FormatSerial(cert.SerialNumber),
		NotAfter: cert.NotAfter,
	}, nil
}

type identityKey struct{}

// ContextWithIdentity returns ctx carrying id. The interceptors call it after
// verifying the caller; tests of services call it to stand in for them.
func ContextWithIdentity(ctx context.Context, id Identity) context.Context {
	return context.WithValue(ctx, identityKey{}, id)
}

// IdentityFromContext returns the caller's identity put there by the pki
// interceptors; ok is false when the call did not pass through them.
func IdentityFromContext(ctx context.Context) (id Identity, ok bool) {
	id, ok = ctx.Value(identityKey{}).(Identity)
	return id, ok
}
