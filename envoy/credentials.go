package envoy

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/pki"
)

// Credentials are the envoy's TLS identity.
type Credentials struct {
	// ClientTLS returns a client configuration that presents the envoy's
	// certificate and verifies a server named serverName against the
	// federation root.
	ClientTLS func(serverName string) *tls.Config
	// Certificate is the envoy's own leaf certificate: its CN is the envoy's
	// name and its OU its role.
	Certificate *x509.Certificate
}

// CredentialsSource produces the envoy's credentials at start-up.
type CredentialsSource func() (Credentials, error)

// KeyringCredentials loads the envoy's certificate, key, the federation root
// and optionally the CRL through a pki.Keyring, which reloads them when the
// files change: a renewed certificate or a new CRL needs no restart.
func KeyringCredentials(files pki.Files, log hclog.Logger) CredentialsSource {
	return func() (Credentials, error) {
		k, err := pki.NewKeyring(pki.KeyringConfig{Files: files, Logger: log})
		if err != nil {
			return Credentials{}, err
		}
		return Credentials{ClientTLS: k.ClientConfig, Certificate: k.Certificate()}, nil
	}
}

// checkIdentity returns the envoy's name from its certificate, refusing a
// certificate of another role and a configured name that is not the CN:
// the director knows a party only by its certificate, so an envoy that
// believed another name would be refused on every call.
func checkIdentity(cert *x509.Certificate, configured string) (string, error) {
	id, err := pki.IdentityFromCertificate(cert)
	if err != nil {
		return "", err
	}
	if id.Role != pki.RoleEnvoy {
		return "", fmt.Errorf("certificate of %q has role %q, not %q: an envoy needs an envoy certificate (fx pki certify --role envoy)",
			id.Name, id.Role, pki.RoleEnvoy)
	}
	if configured != "" && configured != id.Name {
		return "", fmt.Errorf("name %q does not match the certificate's CN %q: set name to %q or leave it out", configured, id.Name, id.Name)
	}
	return id.Name, nil
}
