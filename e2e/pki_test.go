package e2e

import (
	"path/filepath"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestPKIBootstrapAndCSR: a federation whose certificates come from
// scripts/pki-bootstrap.sh, plus a site that enrolls with a certificate
// request so its key never leaves it (fx pki csr at the site, fx pki sign
// at the CA, fx pki import at the site), runs an experiment.
func TestPKIBootstrapAndCSR(t *testing.T) {
	f := newFedBootstrap(t, "carol", []string{"site-a"})
	site := f.partyDir("envoy", "site-b")
	signed := filepath.Join(f.dir, "signed")
	f.fx("pki", "csr", "--role", "envoy", "--name", "site-b", "--out", site)
	f.fx("pki", "sign", "--dir", f.ca, "--csr", filepath.Join(site, "site-b.csr"), "--role", "envoy", "--out", signed)
	f.fx("pki", "import", "--crt", filepath.Join(signed, "site-b.crt"), "--ca", filepath.Join(signed, "ca.crt"), "--out", site)
	if out := f.fx("pki", "show", filepath.Join(site, "site-b.crt"), "--ca", filepath.Join(site, "ca.crt")); out == "" {
		t.Error("fx pki show printed nothing")
	}

	f.startDirector(directorOptions{})
	f.startEnvoy("site-a", syntheticShard(1, 2, ""))
	f.startEnvoy("site-b", syntheticShard(2, 2, ""))
	c := f.researcher("carol")
	f.waitEnvoysOnline(c, "site-a", "site-b")
	f.submit("carol", writePlan(t, syntheticPlan("enrolled", 1, "", "")))
	e := f.waitState(c, "enrolled", time.Minute, fxv1.ExperimentState_FINISHED)
	for _, s := range []string{"site-a", "site-b"} {
		if p := participant(e, s); p.GetState() != fxv1.ParticipantState_COMPLETED {
			t.Errorf("%s: %v", s, p)
		}
	}
}
