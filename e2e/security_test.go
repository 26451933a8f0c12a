package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestSecurity: owners are isolated, roles are enforced, a revoked envoy is
// refused once the CA's CRL file changes under a running director, and a
// certificate from another CA is refused in the handshake.
func TestSecurity(t *testing.T) {
	f := newFed(t, []string{"alice", "bob"}, []string{"site-1", "site-2"})
	f.certify("admin", "root")
	// Manual review: alice's experiment waits PENDING, no training needed.
	f.startDirector(directorOptions{review: "manual"})
	f.startEnvoy("site-1", syntheticShard(1, 2, ""))
	f.startEnvoy("site-2", syntheticShard(2, 2, ""))
	alice, bob := f.researcher("alice"), f.researcher("bob")
	f.waitEnvoysOnline(alice, "site-1", "site-2")

	e := f.submit("alice", writePlan(t, syntheticPlan("secret", 2, "", "")))
	if e.GetState() != fxv1.ExperimentState_PENDING {
		t.Fatalf("under manual review the experiment is %s, want PENDING", e.GetState())
	}

	t.Run("other researchers see nothing", func(t *testing.T) {
		f := f.sub(t)
		for _, args := range [][]string{
			{"status", "secret"},
			{"cancel", "secret", "--reason", "mine now"},
			{"watch", "secret"},
			{"model", "secret", "-o", filepath.Join(t.TempDir(), "m.safetensors")},
			{"remove", "secret"},
		} {
			r := f.exp("bob", args...)
			if r.err == nil {
				t.Errorf("bob: fx experiment %v succeeded:\n%s", args, r.stdout)
			} else if !strings.Contains(r.stderr, "NotFound") {
				t.Errorf("bob: fx experiment %v: %q, want NotFound", args, r.stderr)
			}
		}
		// The id does not help either.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		raw := fxv1.NewDirectorClient(rawConn(t, f.files("researcher", "bob"), f.addr))
		_, err := raw.CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: e.GetId()}})
		if status.Code(err) != codes.NotFound {
			t.Errorf("bob cancels alice's experiment by id: %v, want NotFound", err)
		}
		_, err = raw.GetExperiment(ctx, &fxv1.GetExperimentRequest{Experiment: &fxv1.ExperimentRef{Name: "secret", Owner: "alice"}})
		if status.Code(err) != codes.NotFound && status.Code(err) != codes.PermissionDenied {
			t.Errorf("bob names alice as the owner: %v, want NotFound or PermissionDenied", err)
		}
		list, err := bob.List(ctx)
		if err != nil || len(list) != 0 {
			t.Errorf("bob lists %v (%v), want nothing", list, err)
		}
		// Still alice's, still PENDING; an admin sees it as alice/secret.
		if got, err := alice.Get(ctx, "secret"); err != nil || got.GetState() != fxv1.ExperimentState_PENDING {
			t.Errorf("alice's experiment after bob's attempts: %v (%v), want PENDING", got, err)
		}
		admin, err := f.dialAs("admin", "root", 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer admin.Close()
		if got, err := admin.Get(ctx, "alice/secret"); err != nil || got.GetId() != e.GetId() {
			t.Errorf("admin gets alice/secret: %v (%v)", got, err)
		}
	})

	t.Run("an envoy certificate cannot submit", func(t *testing.T) {
		f := f.sub(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		raw := fxv1.NewDirectorClient(rawConn(t, f.files("envoy", "site-1"), f.addr))
		stream, err := raw.SubmitExperiment(ctx)
		if err == nil {
			plan := syntheticPlan("sneaky", 1, "", "")
			_ = stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{Size: 1, Sha256: strings.Repeat("0", 64), PlanYaml: plan}}})
			_, err = stream.CloseAndRecv()
		}
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("envoy submits: %v, want PermissionDenied", err)
		}
		// Nor may it read experiments.
		_, err = raw.ListExperiments(ctx, &fxv1.ListExperimentsRequest{})
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("envoy lists experiments: %v, want PermissionDenied", err)
		}
		// The CLI says why before connecting.
		env := f.files("envoy", "site-1")
		r := f.runFx("experiment", "list", "--director", f.addr, "--server-name", "localhost", "--cert", env.Cert, "--key", env.Key, "--ca", env.CA)
		if r.err == nil || !strings.Contains(r.stderr, "researcher") {
			t.Errorf("fx experiment list with an envoy certificate: %v %q, want a refusal naming the researcher role", r.err, r.stderr)
		}
		// And a researcher may not act as an envoy.
		rr := fxv1.NewDirectorClient(rawConn(t, f.files("researcher", "bob"), f.addr))
		_, err = rr.Heartbeat(ctx, &fxv1.HeartbeatRequest{EnvoyName: "site-1"})
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("researcher heartbeats as site-1: %v, want PermissionDenied", err)
		}
	})

	t.Run("an envoy naming another is refused", func(t *testing.T) {
		f := f.sub(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		raw := fxv1.NewDirectorClient(rawConn(t, f.files("envoy", "site-1"), f.addr))
		_, err := raw.Heartbeat(ctx, &fxv1.HeartbeatRequest{EnvoyName: "site-2"})
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("site-1 heartbeats as site-2: %v, want PermissionDenied", err)
		}
	})

	t.Run("a certificate from another CA is refused", func(t *testing.T) {
		f := f.sub(t)
		other := filepath.Join(t.TempDir(), "other")
		f.fx("pki", "init", "--dir", filepath.Join(other, "ca"), "--org", "impostors")
		for _, p := range []struct{ role, name string }{{"researcher", "alice"}, {"envoy", "site-1"}} {
			f.fx("pki", "certify", "--dir", filepath.Join(other, "ca"), "--role", p.role, "--name", p.name, "--out", filepath.Join(other, p.name))
		}
		// fx's own client will not even load such a certificate.
		files := pki.PartyFiles(filepath.Join(other, "alice"), "alice")
		files.CA = f.files("researcher", "alice").CA
		r := f.runFx("experiment", "list", "--director", f.addr, "--server-name", "localhost", "--cert", files.Cert, "--key", files.Key, "--ca", files.CA)
		if r.err == nil || !strings.Contains(r.stderr, "does not chain to the federation root") {
			t.Errorf("fx experiment list with another CA's certificate: %v %q", r.err, r.stderr)
		}
		// A plain TLS client that presents it (and trusts the
		// federation's root) is refused by the director in the handshake:
		// with TLS 1.3 the client learns of it from the alert it reads next.
		for _, p := range []string{"alice", "site-1"} {
			err := tlsHandshake(t, filepath.Join(other, p, p+".crt"), filepath.Join(other, p, p+".key"), files.CA, f.addr)
			if err == nil || !strings.Contains(err.Error(), "unknown certificate authority") {
				t.Errorf("another CA's %s: handshake %v, want the director's alert: unknown certificate authority", p, err)
			}
		}
		// The same client with the federation's certificate gets through,
		// so the refusal is the CA's doing.
		ok := f.files("researcher", "alice")
		if err := tlsHandshake(t, ok.Cert, ok.Key, ok.CA, f.addr); err != nil {
			t.Errorf("the federation's alice: handshake %v", err)
		}
	})

	// Last: it takes site-2 away.
	t.Run("a revoked envoy is refused", func(t *testing.T) {
		f := f.sub(t)
		out := f.fx("pki", "revoke", "--dir", f.ca, "--name", "site-2")
		t.Logf("fx pki revoke: %s", strings.TrimSpace(out))
		// A new connection is refused in the handshake, and the running
		// envoy's heartbeats on its open connection are refused too, so it
		// goes offline.
		raw := fxv1.NewDirectorClient(rawConn(t, f.files("envoy", "site-2"), f.addr))
		f.waitFor(30*time.Second, "the director to refuse site-2", func() (bool, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := raw.Heartbeat(ctx, &fxv1.HeartbeatRequest{EnvoyName: "site-2"})
			if status.Code(err) == codes.Unauthenticated {
				if !strings.Contains(err.Error(), "revoked") {
					t.Errorf("refusal %v does not say the certificate was revoked", err)
				}
				return true, nil
			}
			return false, err
		})
		f.waitFor(30*time.Second, "site-2 offline, site-1 online", func() (bool, error) {
			online, err := f.onlineEnvoys(alice)
			if err != nil {
				return false, err
			}
			return !online["site-2"] && online["site-1"], nil
		})
		// The site's operator can tell why.
		if log := f.envoys["site-2"].log(); !strings.Contains(log, "revoked") {
			t.Errorf("site-2's log does not say its certificate was revoked")
		}
	})
}
