package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestReviewAndConcurrency: under manual review an admin approves and
// rejects experiments with `fx director approve|reject`; a data owner with
// a manual policy sees the offers with `fx envoy pending` and answers with
// `fx envoy approve|reject` on the envoy's admin socket; two approved
// experiments run at once over the same envoys, each with its own
// aggregator; an offer nobody can accept any more fails at its
// accept_timeout with the reason.
func TestReviewAndConcurrency(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	admin := f.certify("admin", "ops")
	f.startDirector(directorOptions{review: "manual"})
	f.startEnvoy("site-1", syntheticShard(1, 2, ""))
	// site-2's data owner reviews by hand.
	// (Three places, so it is offered all three experiments at once.)
	f.startEnvoyOpts("site-2", syntheticShard(2, 2, ""), envoyOptions{review: "manual", maxExp: 3})
	site2Config := f.envoyConfigs["site-2"]
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	plan := func(name, participants string) string {
		return strings.Replace(syntheticPlan(name, 3, "", ""), "participants: {min: 2, tags: [synthetic]}", "participants: "+participants, 1)
	}
	both := "{min: 2, tags: [synthetic]}"
	for _, p := range []struct{ name, participants string }{
		{"exp-a", both}, {"exp-b", both}, {"exp-c", both},
		{"exp-d", "{min: 1, envoys: [site-2], accept_timeout: 3s}"},
	} {
		if e := f.submit("alice", writePlan(t, plan(p.name, p.participants))); e.GetState() != fxv1.ExperimentState_PENDING {
			t.Fatalf("%s is %s under manual review, want PENDING", p.name, e.GetState())
		}
	}

	adminArgs := []string{"--director", f.addr, "--server-name", "localhost", "--tls-cert", admin.Cert, "--tls-key", admin.Key, "--tls-ca", admin.CA, "--owner", "alice"}
	for _, name := range []string{"exp-a", "exp-b", "exp-d"} {
		f.fx(append([]string{"director", "approve", name}, adminArgs...)...)
	}
	f.fx(append([]string{"director", "reject", "exp-c", "--reason", "uses too much of the sites' time"}, adminArgs...)...)
	if e := f.waitState(c, "exp-c", 10*time.Second, fxv1.ExperimentState_REJECTED); !strings.Contains(e.GetReason(), "too much of the sites' time") {
		t.Errorf("the rejected experiment's reason is %q", e.GetReason())
	}
	// A researcher may not review.
	files := f.files("researcher", "alice")
	if r := f.runFx("director", "approve", "exp-c", "--director", f.addr, "--server-name", "localhost", "--tls-cert", files.Cert, "--tls-key", files.Key, "--tls-ca", files.CA); r.err == nil || !strings.Contains(r.stderr+r.stdout, "PermissionDenied") && !strings.Contains(r.stderr+r.stdout, "admin") {
		t.Errorf("a researcher approves: %v %q, want a refusal", r.err, r.stderr)
	}

	// site-2's owner sees the three offers once downloaded and checked.
	var pending []struct {
		Name, Owner, ID string
	}
	f.waitFor(30*time.Second, "three offers pending at site-2", func() (bool, error) {
		r := f.runFx("envoy", "pending", "--config", site2Config, "--json")
		if r.err != nil {
			return false, fmt.Errorf("%v: %s", r.err, r.stderr)
		}
		pending = nil
		if err := json.Unmarshal([]byte(r.stdout), &pending); err != nil {
			return false, err
		}
		return len(pending) == 3, fmt.Errorf("pending: %s", r.stdout)
	})
	var names []string
	for _, p := range pending {
		names = append(names, p.Name)
		if p.Owner != "alice" {
			t.Errorf("offer %s: owner %q", p.Name, p.Owner)
		}
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"exp-a", "exp-b", "exp-d"}) {
		t.Errorf("pending at site-2: %v", names)
	}
	for _, name := range []string{"exp-a", "exp-b"} {
		f.fx("envoy", "approve", name, "--config", site2Config)
	}
	f.fx("envoy", "reject", "exp-d", "--config", site2Config, "--reason", "not on our patients")

	for _, name := range []string{"exp-a", "exp-b"} {
		e := f.waitState(c, name, 2*time.Minute, fxv1.ExperimentState_FINISHED)
		if e.GetRound() != 3 {
			t.Errorf("%s finished at round %d, want 3", name, e.GetRound())
		}
	}
	// Each had its own aggregator.
	var addrs []string
	for _, line := range strings.Split(f.director.log(), "\n") {
		if strings.Contains(line, "aggregator starting:") {
			addrs = append(addrs, logField(line, "address"))
		}
	}
	if len(addrs) != 2 || addrs[0] == addrs[1] {
		t.Errorf("aggregators started at %v, want two different addresses", addrs)
	}

	e := f.waitState(c, "exp-d", 30*time.Second, fxv1.ExperimentState_FAILED)
	t.Logf("exp-d: %s", e.GetReason())
	if p := participant(e, "site-2"); p.GetState() != fxv1.ParticipantState_DECLINED || !strings.Contains(p.GetReason(), "not on our patients") {
		t.Errorf("site-2 in exp-d: %v, want DECLINED with the owner's reason", p)
	}
	if !strings.Contains(e.GetReason(), "accept") {
		t.Errorf("exp-d failed with %q, want the accept timeout named", e.GetReason())
	}
}

// TestEnvoyCapacity: an envoy that runs one experiment at a time
// (max_experiments: 1) and whose data owner reviews by hand is offered a
// second experiment only once the first has ended, so approving every
// offer it shows never makes it refuse a start. Both experiments finish.
func TestEnvoyCapacity(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1"})
	f.startDirector(directorOptions{})
	f.startEnvoyOpts("site-1", slowShard(1, 1), envoyOptions{review: "manual", maxExp: 1})
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1")
	cfg := f.envoyConfigs["site-1"]

	for _, name := range []string{"first", "second"} {
		plan := strings.Replace(syntheticPlan(name, 2, slowHyper, ""), "participants: {min: 2, tags: [synthetic]}", "participants: {min: 1, envoys: [site-1]}", 1)
		f.submit("alice", writePlan(t, plan))
	}
	// The data owner approves whatever is pending, until both have ended.
	approved := map[string]bool{}
	var pendingBoth bool
	f.waitFor(3*time.Minute, "both experiments to end", func() (bool, error) {
		r := f.runFx("envoy", "pending", "--config", cfg, "--json")
		if r.err != nil {
			return false, fmt.Errorf("%v: %s", r.err, r.stderr)
		}
		var pending []struct{ Name string }
		if err := json.Unmarshal([]byte(r.stdout), &pending); err != nil {
			return false, err
		}
		pendingBoth = pendingBoth || len(pending) > 1
		for _, p := range pending {
			if !approved[p.Name] {
				f.fx("envoy", "approve", p.Name, "--config", cfg)
				approved[p.Name] = true
			}
		}
		ended := 0
		for _, name := range []string{"first", "second"} {
			e, err := getExp(c, name)
			if err != nil {
				return false, err
			}
			if e.GetState() == fxv1.ExperimentState_FAILED {
				t.Fatalf("%s FAILED: %s", name, e.GetReason())
			}
			if experiment.Ended(e.GetState()) {
				ended++
			}
		}
		return ended == 2, fmt.Errorf("approved %v", approved)
	})
	if pendingBoth {
		t.Errorf("site-1 (max_experiments 1) was offered both experiments at once")
	}
	for _, name := range []string{"first", "second"} {
		if e, err := getExp(c, name); err != nil || e.GetState() != fxv1.ExperimentState_FINISHED {
			t.Errorf("%s: %v (%v), want FINISHED", name, e.GetState(), err)
		}
	}
}

// TestPendingOfferAcrossRestarts: an offer awaiting the data owner's
// decision survives the director's crash and the envoy's restart; the
// owner approves it afterwards and the experiment runs.
func TestPendingOfferAcrossRestarts(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1"})
	f.startDirector(directorOptions{})
	site := f.startEnvoyReview("site-1", syntheticShard(1, 1, ""), "manual")
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1")
	cfg := f.envoyConfigs["site-1"]

	plan := strings.Replace(syntheticPlan("patient", 2, "", ""), "participants: {min: 2, tags: [synthetic]}", "participants: {min: 1, envoys: [site-1]}", 1)
	f.submit("alice", writePlan(t, plan))
	pending := func() (bool, error) {
		r := f.runFx("envoy", "pending", "--config", cfg, "--json")
		if r.err != nil {
			return false, fmt.Errorf("%v: %s", r.err, r.stderr)
		}
		return strings.Contains(r.stdout, `"patient"`), fmt.Errorf("pending: %s", r.stdout)
	}
	f.waitFor(30*time.Second, "the offer pending at site-1", pending)

	f.director.kill(t)
	f.restartDirector()
	site.stop(t)
	site.start(t)
	f.waitEnvoysOnline(c, "site-1")
	f.waitFor(30*time.Second, "the offer pending at site-1 after the restarts", pending)
	if e, err := getExp(c, "patient"); err != nil || e.GetState() != fxv1.ExperimentState_OFFERED {
		t.Fatalf("after the restarts: %v (%v), want OFFERED", e.GetState(), err)
	}
	f.fx("envoy", "approve", "patient", "--config", cfg)
	f.waitState(c, "patient", time.Minute, fxv1.ExperimentState_FINISHED)
}

// TestAllowlist: a site whose data owner accepts only listed archives
// (review.policy allowlist) declines an unlisted one with a reason, and
// accepts one whose sha256 the owner adds to the list while the envoy
// runs (the list is read at every offer).
func TestAllowlist(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1"})
	f.startDirector(directorOptions{})
	list := filepath.Join(f.dir, "allowlist")
	if err := os.WriteFile(list, []byte("# archives our ethics board approved\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f.startEnvoyOpts("site-1", syntheticShard(1, 1, ""), envoyOptions{review: "allowlist", allowlist: list})
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1")

	archive := func(name, participants string) (string, string) {
		plan := strings.Replace(syntheticPlan(name, 1, "", ""), "participants: {min: 2, tags: [synthetic]}", "participants: "+participants, 1)
		b := makeZip(t, [2]string{"plan.yaml", plan})
		path := filepath.Join(t.TempDir(), name+".zip")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		return path, hex.EncodeToString(sum[:])
	}
	unlisted, _ := archive("unlisted", "{min: 1, envoys: [site-1], accept_timeout: 2s}")
	listed, sum := archive("listed", "{min: 1, envoys: [site-1]}")

	f.submit("alice", unlisted)
	e := f.waitState(c, "unlisted", time.Minute, fxv1.ExperimentState_FAILED)
	p := participant(e, "site-1")
	t.Logf("unlisted: site-1 %s: %s", p.GetState(), p.GetReason())
	if p.GetState() != fxv1.ParticipantState_DECLINED || !strings.Contains(p.GetReason(), "allow-list") {
		t.Errorf("site-1 on the unlisted archive: %v, want DECLINED naming the allowlist", p)
	}

	// The owner approves the other archive, as sha256sum prints it.
	fh, err := os.OpenFile(list, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(fh, "%s  listed.zip\n", sum)
	fh.Close()
	f.submit("alice", listed)
	f.waitState(c, "listed", time.Minute, fxv1.ExperimentState_FINISHED)
}
