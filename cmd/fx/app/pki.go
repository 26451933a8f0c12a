package app

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cloudflare/cfssl/helpers"
	"github.com/spf13/cobra"

	"github.com/fx-fl/fx/pki"
)

func newPKICommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pki",
		Short: "Run the federation's certificate authority and inspect certificates",
		Long: `Every fx party is known by an X.509 certificate from the federation's CA:
the subject's CN is the party's name, its OU the party's role (director,
envoy, researcher or admin). These commands create the CA, issue, sign,
revoke and inspect certificates.

Two ways to give a party its certificate:

  at the CA (the key is made there and must be carried to the party):
    fx pki certify --dir ca --role envoy --name site-1 --out site-1/

  with a CSR (the key never leaves the site):
    site:  fx pki csr --role envoy --name site-1 --out site-1/
    CA:    fx pki sign --dir ca --role envoy --csr site-1.csr --out signed/
    site:  fx pki import --crt signed/site-1.crt --ca signed/ca.crt --out site-1/

A certificate that must change (other director hosts, a new lifetime) is
renewed for the key it has: fx pki renew --dir ca --cert site-1/site-1.crt.

CA directory (--dir), made by 'fx pki init':

  root.crt        the federation root (ECDSA P-384, 10 years); every party
                  gets a copy as ca.crt
  root.key        the root's key (0600); only needed to make a new signing
                  CA, so it can be moved offline after init
  signing.crt     the signing CA (path length 0), issued by the root; it
                  signs every party certificate and the CRL
  signing.key     the signing CA's key (0600)
  crl.pem         the current certificate revocation list; copy it to the
                  director after every revoke ('fx pki crl' re-issues it)
  revoked.json    every revoked certificate; the CRL is made from it
  issued/         a copy of every certificate issued, SERIAL.crt
  .lock           taken while the revocation list is being changed

Party directory (--out):

  NAME.crt        the party's certificate followed by the signing CA
  NAME.key        the party's private key (0600); never overwritten
  ca.crt          the federation root, to verify peers
  NAME.csr        the request, when made with 'fx pki csr'`,
	}
	cmd.AddCommand(
		newPKIInitCommand(),
		newPKICertifyCommand(),
		newPKICSRCommand(),
		newPKISignCommand(),
		newPKIRenewCommand(),
		newPKIImportCommand(),
		newPKIRevokeCommand(),
		newPKICRLCommand(),
		newPKIListCommand(),
		newPKIShowCommand(),
	)
	return cmd
}

func newPKIInitCommand() *cobra.Command {
	var (
		dir string
		org string
		ttl time.Duration
	)
	cmd := &cobra.Command{
		Use:   "init --dir DIR",
		Short: "Create the federation's CA: a root and the signing CA below it",
		Long: `Create a new CA in DIR: an ECDSA P-384 root, a signing CA with path length 0
issued by it, their keys (mode 0600), an empty revocation list and its CRL.

init refuses when DIR already holds a CA: a new root would cut off every party
whose certificate chains to the current one. Issue more certificates with
'fx pki certify' or 'fx pki sign' instead; start a new federation in an empty
directory.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ca, err := pki.InitCA(dir, pki.InitOptions{Organization: org, TTL: ttl})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "created the CA of %q in %s\n", org, ca.Dir())
			fmt.Fprintf(out, "  root         %s (serial %s, until %s)\n", filepath.Join(ca.Dir(), pki.RootCertFile), pki.FormatSerial(ca.Root().SerialNumber), day(ca.Root().NotAfter))
			fmt.Fprintf(out, "  signing CA   %s (serial %s)\n", filepath.Join(ca.Dir(), pki.SigningCertFile), pki.FormatSerial(ca.Signing().SerialNumber))
			fmt.Fprintf(out, "  CRL          %s\n", ca.CRLPath())
			fmt.Fprintf(out, "keep %s and %s secret; %s is only needed to make a new signing CA and can go offline\n",
				pki.SigningKeyFile, pki.RootKeyFile, pki.RootKeyFile)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the new CA (required; created if missing)")
	cmd.Flags().StringVar(&org, "org", "fx", "organization (O) in every certificate, usually the federation's name")
	cmd.Flags().DurationVar(&ttl, "ttl", pki.DefaultCATTL, "lifetime of the root and the signing CA")
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}

// issueFlags are the flags shared by certify and sign.
type issueFlags struct {
	dir   string
	role  string
	name  string
	hosts []string
	ttl   time.Duration
	out   string
}

func (f *issueFlags) request() (pki.IssueRequest, error) {
	role, err := pki.ParseRole(f.role)
	if err != nil {
		return pki.IssueRequest{}, fmt.Errorf("--role: %w", err)
	}
	if f.ttl <= 0 {
		return pki.IssueRequest{}, fmt.Errorf("--ttl %s: give a positive duration such as 8760h", f.ttl)
	}
	return pki.IssueRequest{Role: role, Name: f.name, Hosts: f.hosts, TTL: f.ttl}, nil
}

const hostHelp = "director only: a DNS name or IP address the director is reached on (repeat or comma-separate)"

func newPKICertifyCommand() *cobra.Command {
	f := &issueFlags{}
	cmd := &cobra.Command{
		Use:   "certify --dir CA --role ROLE --name NAME --out DIR",
		Short: "Issue a key and certificate for a party at the CA",
		Long: `Make a key and a certificate for a party and write them to the --out directory:
NAME.crt (the certificate followed by the signing CA), NAME.key (mode 0600)
and ca.crt (the federation root).

The role decides the key usages: a director's certificate serves and dials,
and carries the --host names and addresses (default: its name); envoy,
researcher and admin certificates only dial and carry no hosts.

The key is made at the CA and has to be carried to the party; when a site
must keep its key, use 'fx pki csr' there and 'fx pki sign' here.
NAME.key is never overwritten: certify refuses if it exists.`,
		Example: `  fx pki certify --dir pki/ca --role director --name director.example.org \
      --host director.example.org --host 10.0.0.7 --out pki/director
  fx pki certify --dir pki/ca --role envoy --name site-1 --out pki/envoys/site-1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req, err := f.request()
			if err != nil {
				return err
			}
			ca, err := pki.OpenCA(f.dir)
			if err != nil {
				return err
			}
			iss, files, err := ca.IssueTo(f.out, req)
			if err != nil {
				return err
			}
			printIssued(cmd.OutOrStdout(), iss, files, true)
			return nil
		},
	}
	cmd.Flags().StringVar(&f.dir, "dir", "", "CA directory (required)")
	cmd.Flags().StringVar(&f.role, "role", "", "role: director, envoy, researcher or admin (required)")
	cmd.Flags().StringVar(&f.name, "name", "", "party name, the certificate's CN: 1-64 of [A-Za-z0-9._-] (required)")
	cmd.Flags().StringSliceVar(&f.hosts, "host", nil, hostHelp)
	cmd.Flags().DurationVar(&f.ttl, "ttl", pki.DefaultLeafTTL, "certificate lifetime")
	cmd.Flags().StringVar(&f.out, "out", "", "directory for NAME.crt, NAME.key and ca.crt (required)")
	for _, name := range []string{"dir", "role", "name", "out"} {
		_ = cmd.MarkFlagRequired(name)
	}
	return cmd
}

func printIssued(w io.Writer, iss *pki.Issued, files pki.Files, withKey bool) {
	id := iss.Identity
	fmt.Fprintf(w, "issued %s %s, serial %s, valid until %s\n", id.Role, id.Name, id.Serial, day(id.NotAfter))
	if hosts := hostsOf(iss.Cert); len(hosts) > 0 {
		fmt.Fprintf(w, "  hosts        %s\n", strings.Join(hosts, ", "))
	}
	fmt.Fprintf(w, "  certificate  %s\n", files.Cert)
	if withKey {
		fmt.Fprintf(w, "  key          %s (0600: keep it secret)\n", files.Key)
	}
	fmt.Fprintf(w, "  root         %s\n", files.CA)
}

func newPKICSRCommand() *cobra.Command {
	var (
		name, role, out string
		hosts           []string
	)
	cmd := &cobra.Command{
		Use:   "csr --role ROLE --name NAME --out DIR",
		Short: "Make a key and a certificate request at a site",
		Long: `Make a private key and a certificate signing request for this party, so that
the key never leaves the site. Writes NAME.key (mode 0600; refused if it
exists) and NAME.csr to the --out directory.

Send NAME.csr to the federation's CA, which signs it with 'fx pki sign' and
sends back NAME.crt and ca.crt; install them with 'fx pki import'. The CA
decides the role and usages itself: what the request asks for is a wish.`,
		Example: `  fx pki csr --role envoy --name site-1 --out /etc/fx
  fx pki csr --role director --name director.example.org --host director.example.org --out /etc/fx`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := pki.ParseRole(role)
			if err != nil {
				return fmt.Errorf("--role: %w", err)
			}
			keyPath, csrPath, err := pki.WriteCSR(out, pki.CSRRequest{Name: name, Role: r, Hosts: hosts})
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "made a key and a certificate request for %s %s\n", r, name)
			fmt.Fprintf(w, "  key      %s (0600: it stays here)\n", keyPath)
			fmt.Fprintf(w, "  request  %s\n", csrPath)
			fmt.Fprintf(w, "send %s to the federation's CA; install its answer with\n  fx pki import --crt %s.crt --ca ca.crt --out %s\n", csrPath, name, out)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "party name, the certificate's CN: 1-64 of [A-Za-z0-9._-] (required)")
	cmd.Flags().StringVar(&role, "role", "", "role asked for: director, envoy, researcher or admin (required)")
	cmd.Flags().StringSliceVar(&hosts, "host", nil, hostHelp)
	cmd.Flags().StringVar(&out, "out", "", "directory for NAME.key and NAME.csr (required)")
	for _, n := range []string{"name", "role", "out"} {
		_ = cmd.MarkFlagRequired(n)
	}
	return cmd
}

func newPKISignCommand() *cobra.Command {
	f := &issueFlags{}
	var csrPath string
	cmd := &cobra.Command{
		Use:   "sign --dir CA --csr FILE --role ROLE --out DIR",
		Short: "Sign a site's certificate request at the CA",
		Long: `Issue a certificate for the public key in a request made with 'fx pki csr'.
Writes NAME.crt (the certificate followed by the signing CA) and ca.crt (the
federation root) to the --out directory; send both back to the site.

The CA decides: the role is --role whatever the request's OU says, the key
usages follow the role, and only a director's certificate carries hosts
(--host, else those in the request, else its name). The name is the
request's CN unless --name is given; either way it is validated.`,
		Example: `  fx pki sign --dir pki/ca --csr site-1.csr --role envoy --out signed/`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req, err := f.request()
			if err != nil {
				return err
			}
			csrPEM, err := os.ReadFile(csrPath)
			if err != nil {
				return fmt.Errorf("reading the certificate request: %w", err)
			}
			ca, err := pki.OpenCA(f.dir)
			if err != nil {
				return err
			}
			iss, files, err := ca.SignCSRTo(f.out, csrPEM, req)
			if err != nil {
				return fmt.Errorf("%s: %w", csrPath, err)
			}
			w := cmd.OutOrStdout()
			if asked := requestedRole(csrPEM); asked != "" && asked != string(iss.Identity.Role) {
				fmt.Fprintf(w, "note: the request asked for role %q; the CA issued %s as --role says\n", asked, iss.Identity.Role)
			}
			printIssued(w, iss, files, false)
			fmt.Fprintf(w, "send %s and %s to the site; it installs them with 'fx pki import'\n", files.Cert, files.CA)
			return nil
		},
	}
	cmd.Flags().StringVar(&f.dir, "dir", "", "CA directory (required)")
	cmd.Flags().StringVar(&csrPath, "csr", "", "certificate request made by 'fx pki csr' (required)")
	cmd.Flags().StringVar(&f.role, "role", "", "role to issue: director, envoy, researcher or admin (required)")
	cmd.Flags().StringVar(&f.name, "name", "", "party name; default: the request's CN")
	cmd.Flags().StringSliceVar(&f.hosts, "host", nil, hostHelp+"; default: the request's")
	cmd.Flags().DurationVar(&f.ttl, "ttl", pki.DefaultLeafTTL, "certificate lifetime")
	cmd.Flags().StringVar(&f.out, "out", "", "directory for NAME.crt and ca.crt (required)")
	for _, name := range []string{"dir", "csr", "role", "out"} {
		_ = cmd.MarkFlagRequired(name)
	}
	return cmd
}

func newPKIRenewCommand() *cobra.Command {
	var (
		dir, certPath string
		hosts         []string
		ttl           time.Duration
	)
	cmd := &cobra.Command{
		Use:   "renew --dir CA --cert NAME.crt",
		Short: "Issue a party's certificate again for the key it has: new hosts, new lifetime",
		Long: `Issue a new certificate for the party whose certificate --cert names, for the
private key next to it (NAME.key in the same directory), with the same name
and role, and replace NAME.crt with it. The key does not change, so only the
new NAME.crt has to reach the party; fx parties reload their certificate
from disk without a restart.

Use it when a director's names or addresses change (--host gives the new
list; without it the current hosts are kept) or a certificate nears its
end (--ttl). The previous certificate stays valid until it expires; revoke
it with 'fx pki revoke --serial' if it must stop working sooner.`,
		Example: `  fx pki renew --dir pki/ca --cert pki/director/director.example.org.crt \
      --host director.example.org --host 10.0.0.7
  fx pki renew --dir pki/ca --cert pki/envoys/site-1/site-1.crt --ttl 8760h`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if ttl <= 0 {
				return fmt.Errorf("--ttl %s: give a positive duration such as 8760h", ttl)
			}
			old, id, csrPEM, err := renewalRequest(certPath)
			if err != nil {
				return err
			}
			req := pki.IssueRequest{Role: id.Role, Name: id.Name, Hosts: hosts, TTL: ttl}
			if id.Role == pki.RoleDirector && len(hosts) == 0 {
				req.Hosts = hostsOf(old)
			}
			ca, err := pki.OpenCA(dir)
			if err != nil {
				return err
			}
			iss, files, err := ca.SignCSRTo(filepath.Dir(certPath), csrPEM, req)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			printIssued(w, iss, files, false)
			if was, now := strings.Join(hostsOf(old), ", "), strings.Join(hostsOf(iss.Cert), ", "); was != now {
				fmt.Fprintf(w, "  hosts were   %s\n", orNone(was))
			}
			fmt.Fprintf(w, "the key is unchanged; the previous certificate (serial %s) stays valid until %s: 'fx pki revoke --dir %s --serial %s' ends it sooner\n",
				pki.FormatSerial(old.SerialNumber), day(old.NotAfter), dir, pki.FormatSerial(old.SerialNumber))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "CA directory (required)")
	cmd.Flags().StringVar(&certPath, "cert", "", "the party's certificate, NAME.crt, with NAME.key beside it (required)")
	cmd.Flags().StringSliceVar(&hosts, "host", nil, hostHelp+"; default: the certificate's current hosts")
	cmd.Flags().DurationVar(&ttl, "ttl", pki.DefaultLeafTTL, "lifetime of the new certificate")
	for _, name := range []string{"dir", "cert"} {
		_ = cmd.MarkFlagRequired(name)
	}
	return cmd
}

// renewalRequest reads a party's certificate and the key beside it, checks
// that they belong together, and makes a certificate request signed by that
// key, so the CA can issue the party a new certificate for the key it has.
func renewalRequest(certPath string) (*x509.Certificate, pki.Identity, []byte, error) {
	data, err := os.ReadFile(certPath)
	if err != nil {
		return nil, pki.Identity{}, nil, fmt.Errorf("reading the certificate: %w", err)
	}
	chain, err := pki.ParseCertificatesPEM(data)
	if err != nil {
		return nil, pki.Identity{}, nil, fmt.Errorf("%s: %w", certPath, err)
	}
	old := chain[0]
	id, err := pki.IdentityFromCertificate(old)
	if err != nil {
		return nil, pki.Identity{}, nil, fmt.Errorf("%s is not an fx party's certificate: %w", certPath, err)
	}
	keyPath := pki.PartyFiles(filepath.Dir(certPath), id.Name).Key
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, pki.Identity{}, nil, fmt.Errorf("renewing keeps the party's key, and it is not beside the certificate: %w (a site that holds its key renews with 'fx pki csr' and 'fx pki sign')", err)
	}
	key, err := helpers.ParsePrivateKeyPEM(keyPEM)
	if err != nil {
		return nil, pki.Identity{}, nil, fmt.Errorf("%s: %w", keyPath, err)
	}
	if !bytes.Equal(publicKeyDER(key.Public()), old.RawSubjectPublicKeyInfo) {
		return nil, pki.Identity{}, nil, fmt.Errorf("%s does not belong to %s: the two files are of different keys", keyPath, certPath)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id.Name}}, key)
	if err != nil {
		return nil, pki.Identity{}, nil, fmt.Errorf("a certificate request for %s: %w", keyPath, err)
	}
	return old, id, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

func publicKeyDER(pub crypto.PublicKey) []byte {
	der, _ := x509.MarshalPKIXPublicKey(pub)
	return der
}

// requestedRole returns the OU a CSR asked for, for a note when the CA
// decided otherwise.
func requestedRole(csrPEM []byte) string {
	block, _ := pem.Decode(csrPEM)
	if block == nil {
		return ""
	}
	req, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil || len(req.Subject.OrganizationalUnit) == 0 {
		return ""
	}
	return strings.Join(req.Subject.OrganizationalUnit, ",")
}

func newPKIImportCommand() *cobra.Command {
	var crt, caPath, out string
	cmd := &cobra.Command{
		Use:   "import --crt FILE --ca ca.crt --out DIR",
		Short: "Install at a site the certificate the CA signed for its request",
		Long: `Install a certificate signed by 'fx pki sign' next to the key that
'fx pki csr' made. import checks first that the certificate verifies against
the root in --ca and that it belongs to DIR/NAME.key (NAME is the
certificate's CN), then writes DIR/NAME.crt and DIR/ca.crt. An existing
ca.crt holding a different root is refused.`,
		Example: `  fx pki import --crt site-1.crt --ca ca.crt --out /etc/fx`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			chainPEM, err := os.ReadFile(crt)
			if err != nil {
				return fmt.Errorf("reading the certificate: %w", err)
			}
			rootPEM, err := os.ReadFile(caPath)
			if err != nil {
				return fmt.Errorf("reading the root certificate: %w", err)
			}
			files, id, err := pki.ImportCertificate(out, chainPEM, rootPEM)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "installed %s %s, serial %s, valid until %s\n", id.Role, id.Name, id.Serial, day(id.NotAfter))
			fmt.Fprintf(w, "  certificate  %s\n  key          %s\n  root         %s\n", files.Cert, files.Key, files.CA)
			return nil
		},
	}
	cmd.Flags().StringVar(&crt, "crt", "", "certificate from the CA: NAME.crt (required)")
	cmd.Flags().StringVar(&caPath, "ca", "", "federation root from the CA: ca.crt (required)")
	cmd.Flags().StringVar(&out, "out", "", "directory holding NAME.key, where NAME.crt and ca.crt go (required)")
	for _, n := range []string{"crt", "ca", "out"} {
		_ = cmd.MarkFlagRequired(n)
	}
	return cmd
}

func newPKIRevokeCommand() *cobra.Command {
	var (
		dir, name, serial string
		nextUpdate        time.Duration
	)
	cmd := &cobra.Command{
		Use:   "revoke --dir CA (--name NAME | --serial SERIAL)",
		Short: "Revoke certificates and re-issue the CRL",
		Long: `Revoke a certificate by serial, or every current certificate of a party by
name, record it in revoked.json and re-issue the CRL (crl.pem in the CA
directory), whose path is printed.

Servers refuse a revoked certificate once they see the new CRL: copy crl.pem
to the director (and wherever else a server reads it) after every revoke;
the director reloads it without a restart and refuses the next call, even
on connections that are already open.`,
		Example: `  fx pki revoke --dir pki/ca --name site-3
  fx pki revoke --dir pki/ca --serial 3A9F0C...`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (name == "") == (serial == "") {
				return errors.New("give exactly one of --name and --serial")
			}
			if nextUpdate <= 0 {
				return fmt.Errorf("--next-update %s: give a positive duration such as 720h", nextUpdate)
			}
			ca, err := pki.OpenCA(dir)
			if err != nil {
				return err
			}
			ca.CRLValidity = nextUpdate
			w := cmd.OutOrStdout()
			var revs []pki.Revocation
			if serial != "" {
				n, err := pki.ParseSerial(serial)
				if err != nil {
					return fmt.Errorf("--serial: %w", err)
				}
				rev, err := ca.Revoke(n)
				switch {
				case errors.Is(err, pki.ErrAlreadyRevoked):
					fmt.Fprintf(w, "%s %s (serial %s) was already revoked at %s\n", rev.Role, rev.Name, rev.Serial, rev.RevokedAt.Format(time.RFC3339))
				case err != nil:
					return err
				default:
					revs = append(revs, rev)
				}
			} else {
				revs, err = ca.RevokeName(name)
				if err != nil {
					return err
				}
			}
			for _, r := range revs {
				fmt.Fprintf(w, "revoked %s %s (serial %s)\n", r.Role, r.Name, r.Serial)
			}
			data, err := os.ReadFile(ca.CRLPath())
			if err != nil {
				return fmt.Errorf("reading back the CRL: %w", err)
			}
			crl, err := pki.ParseCRL(data)
			if err != nil {
				return fmt.Errorf("reading back the CRL: %w", err)
			}
			fmt.Fprintf(w, "CRL %s re-issued, next update %s: copy it to the director\n", ca.CRLPath(), crl.NextUpdate.UTC().Format(time.RFC3339))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "CA directory (required)")
	cmd.Flags().StringVar(&name, "name", "", "revoke every current certificate of this party")
	cmd.Flags().StringVar(&serial, "serial", "", "revoke the certificate with this serial (hex, as 'fx pki show' prints it)")
	cmd.Flags().DurationVar(&nextUpdate, "next-update", pki.DefaultCRLValidity, "how long the new CRL is current; re-issue it with 'fx pki crl' before then")
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}

func newPKICRLCommand() *cobra.Command {
	var (
		dir        string
		nextUpdate time.Duration
	)
	cmd := &cobra.Command{
		Use:   "crl --dir CA",
		Short: "Re-issue the CRL with a new next-update time",
		Long: `Re-issue the CA's CRL (crl.pem) from its revocation list with a fresh
next-update time, and print its path. Run it before the current CRL's next
update (servers keep applying a stale CRL but log a warning), and copy the
new file to the director.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if nextUpdate <= 0 {
				return fmt.Errorf("--next-update %s: give a positive duration such as 720h", nextUpdate)
			}
			ca, err := pki.OpenCA(dir)
			if err != nil {
				return err
			}
			path, next, err := ca.WriteCRL(nextUpdate)
			if err != nil {
				return err
			}
			revs, err := ca.Revocations()
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "CRL %s re-issued with %d revocation(s), next update %s\n", path, len(revs), next.UTC().Format(time.RFC3339))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "CA directory (required)")
	cmd.Flags().DurationVar(&nextUpdate, "next-update", pki.DefaultCRLValidity, "how long the new CRL is current")
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}

func newPKIListCommand() *cobra.Command {
	var dir, output string
	cmd := &cobra.Command{
		Use:   "list --dir CA",
		Short: "List every certificate the CA issued, with its status",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ca, err := pki.OpenCA(dir)
			if err != nil {
				return err
			}
			certs, err := ca.List()
			if err != nil {
				return err
			}
			type row struct {
				Role      string     `json:"role"`
				Name      string     `json:"name"`
				Serial    string     `json:"serial"`
				Hosts     []string   `json:"hosts,omitempty"`
				NotBefore time.Time  `json:"not_before"`
				NotAfter  time.Time  `json:"not_after"`
				Status    string     `json:"status"` // valid, expired or revoked
				RevokedAt *time.Time `json:"revoked_at,omitempty"`
			}
			rows := []row{}
			now := time.Now()
			for _, c := range certs {
				r := row{Role: string(c.Role), Name: c.Name, Serial: c.Serial, Hosts: c.Hosts, NotBefore: c.NotBefore, NotAfter: c.NotAfter, Status: "valid"}
				switch {
				case c.Revoked:
					r.Status, r.RevokedAt = "revoked", &c.RevokedAt
				case now.After(c.NotAfter):
					r.Status = "expired"
				}
				rows = append(rows, r)
			}
			if output != outputTable {
				return writeValueAs(cmd.OutOrStdout(), output, rows)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ROLE\tNAME\tSERIAL\tEXPIRES\tSTATUS")
			for _, r := range rows {
				status := r.Status
				if r.RevokedAt != nil {
					status += " " + day(*r.RevokedAt)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Role, r.Name, r.Serial, day(r.NotAfter), status)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "CA directory (required)")
	_ = cmd.MarkFlagRequired("dir")
	addOutputFlag(cmd, &output)
	return cmd
}

func newPKIShowCommand() *cobra.Command {
	var caPath, crlPath string
	cmd := &cobra.Command{
		Use:   "show FILE",
		Short: "Show a certificate or request: name, role, hosts, serial, expiry, validity",
		Long: `Show who a certificate (or a certificate request) is for: name, role, hosts,
serial and expiry. With --ca, also whether it verifies against that root
(intermediates are taken from FILE, as a peer would); with --crl, whether it
is revoked. Exits non-zero when the certificate does not verify, has
expired, or is revoked, so scripts can use it as a check.`,
		Example: `  fx pki show pki/envoys/site-1/site-1.crt --ca pki/envoys/site-1/ca.crt --crl pki/ca/crl.pem`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return showFile(cmd.OutOrStdout(), args[0], caPath, crlPath)
		},
	}
	cmd.Flags().StringVar(&caPath, "ca", "", "root certificate(s) to verify against, e.g. ca.crt")
	cmd.Flags().StringVar(&crlPath, "crl", "", "CRL to check revocation against, e.g. the CA's crl.pem")
	return cmd
}

func showFile(w io.Writer, path, caPath, crlPath string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	if block, _ := pem.Decode(data); block != nil && (block.Type == "CERTIFICATE REQUEST" || block.Type == "NEW CERTIFICATE REQUEST") {
		req, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		fmt.Fprintf(w, "request  %s\n", path)
		fmt.Fprintf(w, "name     %s\n", req.Subject.CommonName)
		fmt.Fprintf(w, "role     %s (asked for; the CA decides)\n", orNone(strings.Join(req.Subject.OrganizationalUnit, ",")))
		hosts := append([]string(nil), req.DNSNames...)
		for _, ip := range req.IPAddresses {
			hosts = append(hosts, ip.String())
		}
		fmt.Fprintf(w, "hosts    %s\n", orNone(strings.Join(hosts, ", ")))
		fmt.Fprintf(w, "key      sha256:%s (compare with the site out of band before signing)\n", keyFingerprint(req.RawSubjectPublicKeyInfo))
		if err := req.CheckSignature(); err != nil {
			return fmt.Errorf("%s is not signed by its own key: %w", path, err)
		}
		return nil
	}

	chain, err := pki.ParseCertificatesPEM(data)
	if err != nil {
		return fmt.Errorf("%s holds no PEM certificate or certificate request: %w", path, err)
	}
	leaf := chain[0]
	now := time.Now()
	fmt.Fprintf(w, "certificate  %s\n", path)
	if id, err := pki.IdentityFromCertificate(leaf); err == nil {
		fmt.Fprintf(w, "name         %s\n", id.Name)
		fmt.Fprintf(w, "role         %s\n", id.Role)
	} else {
		fmt.Fprintf(w, "subject      %s\n", leaf.Subject)
		if leaf.IsCA {
			fmt.Fprintf(w, "role         none: a CA certificate\n")
		} else {
			fmt.Fprintf(w, "role         none: %v\n", err)
		}
	}
	fmt.Fprintf(w, "hosts        %s\n", orNone(strings.Join(hostsOf(leaf), ", ")))
	fmt.Fprintf(w, "serial       %s\n", pki.FormatSerial(leaf.SerialNumber))
	fmt.Fprintf(w, "key          sha256:%s\n", keyFingerprint(leaf.RawSubjectPublicKeyInfo))
	fmt.Fprintf(w, "issuer       %s\n", leaf.Issuer.CommonName)
	fmt.Fprintf(w, "valid        %s to %s\n", leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	fmt.Fprintf(w, "chain        %d certificate(s) in the file\n", len(chain))

	var problems []string
	switch {
	case now.After(leaf.NotAfter):
		fmt.Fprintf(w, "expires      EXPIRED %s ago\n", now.Sub(leaf.NotAfter).Round(time.Minute))
		problems = append(problems, "it has expired")
	case now.Before(leaf.NotBefore):
		fmt.Fprintf(w, "expires      not valid yet\n")
		problems = append(problems, "it is not valid yet")
	default:
		fmt.Fprintf(w, "expires      in %s\n", roughDuration(leaf.NotAfter.Sub(now)))
	}
	if caPath != "" {
		if err := verifyAgainst(chain, caPath); err != nil {
			fmt.Fprintf(w, "verifies     NO against %s: %v\n", caPath, err)
			problems = append(problems, "it does not verify against "+caPath)
		} else {
			fmt.Fprintf(w, "verifies     yes, against %s\n", caPath)
		}
	}
	if crlPath != "" {
		revoked, at, err := revokedIn(chain, caPath, crlPath)
		switch {
		case err != nil:
			return fmt.Errorf("checking revocation: %w", err)
		case revoked:
			fmt.Fprintf(w, "revoked      YES, at %s (%s)\n", at.UTC().Format(time.RFC3339), crlPath)
			problems = append(problems, "it is revoked")
		default:
			fmt.Fprintf(w, "revoked      no (%s)\n", crlPath)
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s: %s", path, strings.Join(problems, ", "))
	}
	return nil
}

// verifyAgainst checks the chain as every fx party does (pki.VerifyChain):
// to a root in caPath, through the signing CA, so a leaf the root signed
// itself is reported as not verifying, as a handshake would refuse it.
func verifyAgainst(chain []*x509.Certificate, caPath string) error {
	rootsPEM, err := os.ReadFile(caPath)
	if err != nil {
		return err
	}
	roots, err := pki.ParseCertificatesPEM(rootsPEM)
	if err != nil {
		return fmt.Errorf("%s: %w", caPath, err)
	}
	err = pki.VerifyChain(chain, roots, time.Now())
	var unknown x509.UnknownAuthorityError
	if errors.As(err, &unknown) && len(chain) == 1 && !chain[0].IsCA {
		return fmt.Errorf("%w (the file holds only the leaf; fx certificates are followed by their signing CA)", err)
	}
	return err
}

// revokedIn checks the leaf against the CRL after verifying the CRL's
// signature with the certificate's issuer, found in the file or in caPath.
func revokedIn(chain []*x509.Certificate, caPath, crlPath string) (bool, time.Time, error) {
	data, err := os.ReadFile(crlPath)
	if err != nil {
		return false, time.Time{}, err
	}
	crl, err := pki.ParseCRL(data)
	if err != nil {
		return false, time.Time{}, fmt.Errorf("%s: %w", crlPath, err)
	}
	candidates := append([]*x509.Certificate(nil), chain[1:]...)
	if caPath != "" {
		if rootsPEM, err := os.ReadFile(caPath); err == nil {
			for rest := rootsPEM; ; {
				var block *pem.Block
				block, rest = pem.Decode(rest)
				if block == nil {
					break
				}
				if c, err := x509.ParseCertificate(block.Bytes); err == nil {
					candidates = append(candidates, c)
				}
			}
		}
	}
	leaf := chain[0]
	signed := false
	for _, c := range candidates {
		if string(c.RawSubject) == string(leaf.RawIssuer) && crl.CheckSignatureFrom(c) == nil {
			signed = true
			break
		}
	}
	if !signed {
		return false, time.Time{}, fmt.Errorf("%s is not signed by the CA that issued this certificate", crlPath)
	}
	for _, e := range crl.RevokedCertificateEntries {
		if e.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
			return true, e.RevocationTime, nil
		}
	}
	return false, time.Time{}, nil
}

func hostsOf(c *x509.Certificate) []string {
	hosts := append([]string(nil), c.DNSNames...)
	for _, ip := range c.IPAddresses {
		hosts = append(hosts, ip.String())
	}
	return hosts
}

// keyFingerprint identifies a public key, so a site and the CA can confirm
// over the phone that a request is the one the site made.
func keyFingerprint(spki []byte) string {
	sum := sha256.Sum256(spki)
	return hex.EncodeToString(sum[:])
}

func orNone(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func day(t time.Time) string { return t.UTC().Format("2006-01-02") }

func roughDuration(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%d days", int(d.Hours()/24))
	case d >= 2*time.Hour:
		return fmt.Sprintf("%d hours", int(d.Hours()))
	default:
		return d.Round(time.Second).String()
	}
}
