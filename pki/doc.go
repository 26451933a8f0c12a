// Package pki is the federation's certificate authority and the code that
// turns its certificates into authenticated, authorised gRPC connections.
//
// Every fx party is known only by its X.509 certificate: the subject's CN is
// the party's name and its OU the party's role (director, envoy, researcher,
// admin). The package covers the whole life of those certificates:
//
//   - a two-level CA built on cfssl: a long-lived ECDSA P-384 root that only
//     signs the signing CA, and a signing (intermediate) CA with path length
//     zero that issues every leaf, so the root key can live offline (CA, InitCA,
//     OpenCA);
//   - issuance per role with the key usages the role needs, either with the key
//     made at the CA (CA.Issue) or from a CSR so that a site keeps its private
//     key (NewCSR, CA.SignCSR, ImportCertificate);
//   - revocation recorded in the CA directory and published as a CRL signed by
//     the signing CA (CA.Revoke, CA.WriteCRL);
//   - a Keyring that reloads a party's certificate, key, federation root and CRL
//     from disk when they change, and builds TLS 1.3 mutual-TLS configurations
//     from them (Keyring.ServerConfig, Keyring.ClientConfig);
//   - gRPC interceptors that put the caller's Identity into the request
//     context and enforce a per-method table of allowed roles (Rules),
//     refusing expired and revoked certificates on every call, and
//     RequireCaller for request fields that name a party.
//
// Identity comes only from the verified peer certificate, never from a request
// field; a method without a rule is refused (fail closed).
package pki

import cflog "github.com/cloudflare/cfssl/log"

func init() {
	// cfssl logs every key generation and signature at info level on stderr;
	// fx reports what it did itself, so only cfssl's fatal messages remain.
	cflog.Level = cflog.LevelFatal
}
