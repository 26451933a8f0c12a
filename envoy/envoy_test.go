package envoy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

func TestRegistersAndHeartbeats(t *testing.T) {
	d := newFakeDirector(t)
	s := startSite(t, testConfig(t, d, "site-a"), nil)

	d.waitFor("three heartbeats", func() bool { return d.heartbeats["site-a"] >= 3 })
	d.mu.Lock()
	reg := d.registered["site-a"]
	d.mu.Unlock()
	sh := reg.GetShard()
	if !slices.Equal(sh.GetSampleShape(), []int64{4}) || sh.GetTrainSamples() != 40 || sh.GetValidSamples() != 10 || sh.GetClasses() != 2 {
		t.Errorf("registered shard %v, want 4 features, 40+10 samples, 2 classes", sh)
	}
	if !slices.Equal(sh.GetTags(), []string{"synthetic"}) || reg.GetMaxExperiments() != 1 {
		t.Errorf("registered tags %v and max_experiments %d", sh.GetTags(), reg.GetMaxExperiments())
	}
	if s.envoy.Name() != "site-a" {
		t.Errorf("Name() = %q, want the CN site-a", s.envoy.Name())
	}
	d.waitFor("an assignment stream", func() bool { return d.streams["site-a"] >= 1 })
	if n := strings.Count(s.log.String(), "connected to the director"); n != 1 {
		t.Errorf("logged %d connections, want 1:\n%s", n, s.log.String())
	}
}

func TestReregistersWhenDirectorLosesIt(t *testing.T) {
	tests := []struct {
		name string
		lose func(d *fakeDirector)
	}{
		{"director restarted", func(d *fakeDirector) { d.restart() }},
		{"director forgot the registration", func(d *fakeDirector) {
			d.update(func() { d.registered = map[string]*fxv1.RegisterEnvoyRequest{} })
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := newFakeDirector(t)
			s := startSite(t, testConfig(t, d, "site-a"), nil)
			d.waitFor("heartbeats", func() bool { return d.heartbeats["site-a"] >= 2 })

			tc.lose(d)
			d.mu.Lock()
			before := d.heartbeats["site-a"]
			d.mu.Unlock()
			d.waitFor("a second registration", func() bool { return d.registrations["site-a"] >= 2 })
			d.waitFor("heartbeats after re-registering", func() bool { return d.heartbeats["site-a"] >= before+2 })
			d.waitFor("a new assignment stream", func() bool { return d.streams["site-a"] >= 2 })

			// The new stream works.
			plan := fmt.Sprintf(softmaxPlan, "after")
			d.push("site-a", d.offer("exp-after", makeArchive(t, plan, 0), plan), true)
			if a := d.answer("site-a", "exp-after"); !a.GetAccept() {
				t.Errorf("offer after re-registering answered %v", a)
			}
			log := s.log.String()
			if n := strings.Count(log, "connected to the director"); n < 2 {
				t.Errorf("logged %d connections, want one per session:\n%s", n, log)
			}
			if n := strings.Count(log, "[WARN]"); n > 3 {
				t.Errorf("logged %d warnings for one loss, want the state changes only:\n%s", n, log)
			}
		})
	}
}

func TestStaysUpWhileDirectorIsDown(t *testing.T) {
	d := newFakeDirector(t)
	s := startSite(t, testConfig(t, d, "site-a"), nil)
	d.waitFor("heartbeats", func() bool { return d.heartbeats["site-a"] >= 1 })
	d.stop()
	// Many attempts fail while the director is down...
	eventually(t, "retries while the director is down", func() bool {
		return strings.Count(s.log.String(), "director still unreachable") >= 3
	})
	log := s.log.String()
	if n := strings.Count(log, "disconnected from the director"); n != 1 {
		t.Errorf("logged the disconnection %d times, want once:\n%s", n, log)
	}
	// ...and the envoy comes back by itself.
	d.restart()
	d.waitFor("a registration after the outage", func() bool { return d.registrations["site-a"] >= 2 })
	d.waitFor("heartbeats after the outage", func() bool { return d.heartbeats["site-a"] >= 2 })
}

func TestDownloadResumesFromOffset(t *testing.T) {
	d := newFakeDirector(t)
	plan := fmt.Sprintf(softmaxPlan, "resume")
	archive := makeArchive(t, plan, 8*archiveChunk)
	cut := int64(3 * archiveChunk)
	d.update(func() { d.cutAfter["exp-1"] = cut })
	s := startSite(t, testConfig(t, d, "site-a"), nil)

	d.push("site-a", d.offer("exp-1", archive, plan), true)
	if a := d.answer("site-a", "exp-1"); !a.GetAccept() {
		t.Fatalf("answer %v, want accept", a)
	}
	d.mu.Lock()
	downloads := slices.Clone(d.downloads)
	d.mu.Unlock()
	want := []download{{"exp-1", 0}, {"exp-1", cut}}
	if !slices.Equal(downloads, want) {
		t.Errorf("downloads %v, want %v (resumed at the byte where the stream broke)", downloads, want)
	}
	got, err := os.ReadFile(filepath.Join(s.cfg.WorkDir, "experiments", "exp-1", archiveFile))
	if err != nil || digest(got) != digest(archive) {
		t.Errorf("stored archive differs from the director's (err %v)", err)
	}
	if _, err := os.Stat(filepath.Join(s.cfg.WorkDir, "experiments", "exp-1", filesDir, "blob.bin")); err != nil {
		t.Errorf("archive not unpacked: %v", err)
	}
}

func TestStalledDownloadAbandonedAndResumed(t *testing.T) {
	d := newFakeDirector(t)
	plan := fmt.Sprintf(softmaxPlan, "stall")
	archive := makeArchive(t, plan, 5*archiveChunk)
	stall := int64(2 * archiveChunk)
	d.update(func() { d.stallAfter["exp-s"] = stall })
	cfg := testConfig(t, d, "site-a")
	cfg.RPCTimeout = 300 * time.Millisecond
	s := startSite(t, cfg, nil)
	d.push("site-a", d.offer("exp-s", archive, plan), true)
	if a := d.answer("site-a", "exp-s"); !a.GetAccept() {
		t.Fatalf("answer %v, want accept", a)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if want := []download{{"exp-s", 0}, {"exp-s", stall}}; !slices.Equal(d.downloads, want) {
		t.Errorf("downloads %v, want %v", d.downloads, want)
	}
	mustContain(t, "log", s.log.String(), "stalled")
}

func TestResumesPartialFileLeftByEarlierRun(t *testing.T) {
	d := newFakeDirector(t)
	plan := fmt.Sprintf(softmaxPlan, "partial")
	archive := makeArchive(t, plan, 6*archiveChunk)
	cfg := testConfig(t, d, "site-a")
	// An earlier envoy recorded the offer and died after writing 2500
	// bytes of the archive.
	offer := d.offer("exp-p", archive, plan)
	dir := filepath.Join(cfg.WorkDir, "experiments", "exp-p")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	o := offer.GetOffer()
	rec, _ := json.Marshal(record{ID: "exp-p", Name: o.GetName(), Owner: o.GetOwner(), ArchiveSize: o.GetArchiveSize(), ArchiveSHA256: o.GetArchiveSha256(), PlanYAML: plan})
	if err := os.WriteFile(filepath.Join(dir, recordFile), rec, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, partFile), archive[:2500], 0o600); err != nil {
		t.Fatal(err)
	}
	startSite(t, cfg, nil)
	d.push("site-a", offer, true)
	if a := d.answer("site-a", "exp-p"); !a.GetAccept() {
		t.Fatalf("answer %v, want accept", a)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !slices.Equal(d.downloads, []download{{"exp-p", 2500}}) {
		t.Errorf("downloads %v, want one from offset 2500", d.downloads)
	}
}

func TestCorruptArchiveRejected(t *testing.T) {
	d := newFakeDirector(t)
	plan := fmt.Sprintf(softmaxPlan, "corrupt")
	archive := makeArchive(t, plan, 4*archiveChunk)
	d.update(func() { d.corrupt["exp-bad"] = true })
	s := startSite(t, testConfig(t, d, "site-a"), nil)

	d.push("site-a", d.offer("exp-bad", archive, plan), true)
	a := d.answer("site-a", "exp-bad")
	if a.GetAccept() {
		t.Fatal("a corrupted archive was accepted")
	}
	mustContain(t, "reason", a.GetReason(), "sha256 mismatch", digest(archive))
	d.mu.Lock()
	downloads := slices.Clone(d.downloads)
	d.mu.Unlock()
	if !slices.Equal(downloads, []download{{"exp-bad", 0}, {"exp-bad", 0}}) {
		t.Errorf("downloads %v, want two whole downloads (one retry from the start)", downloads)
	}
	// Once the director has the answer nothing of the experiment remains.
	eventually(t, "the rejected experiment's directory to go", func() bool {
		_, err := os.Stat(filepath.Join(s.cfg.WorkDir, "experiments", "exp-bad"))
		return errors.Is(err, os.ErrNotExist)
	})
}

func TestReviewPolicies(t *testing.T) {
	plan := fmt.Sprintf(softmaxPlan, "policy")
	d := newFakeDirector(t)
	archive := makeArchive(t, plan, 0)
	other := makeArchive(t, fmt.Sprintf(softmaxPlan, "other"), 0)
	allow := filepath.Join(t.TempDir(), "allow.txt")
	if err := os.WriteFile(allow, []byte("# reviewed by the DPO\n"+digest(archive)+"  fashion.tar.gz\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	execYAML := fmt.Sprintf(execPlan, "execy")
	execArchive := makeArchive(t, execYAML, 0, "run.sh", readyRunner)
	brokenArchive := makeArchive(t, execYAML, 0, "run.sh", "echo \"ModuleNotFoundError: No module named 'torchvision'\" >&2\nexit 1\n")
	missingYAML := strings.Replace(execYAML, "[sh, run.sh]", "[./missing.sh]", 1)
	tests := []struct {
		name       string
		policy     string
		archive    []byte
		plan       string
		accept     bool
		wantReason string
	}{
		{"auto accepts", PolicyAuto, archive, plan, true, "auto review policy"},
		{"allowlist accepts a listed digest", PolicyAllowlist, archive, plan, true, "allow-list"},
		{"allowlist rejects the rest", PolicyAllowlist, other, fmt.Sprintf(softmaxPlan, "other"), false, "not on the site's allow-list"},
		{"exec runner whose command is there", PolicyAuto, execArchive, execYAML, true, "auto review policy"},
		{"exec runner refused by the site", PolicyAuto, execArchive, execYAML, false, "exec runners are not allowed at this site"},
		{"exec runner that cannot start", PolicyAuto, brokenArchive, execYAML, false, `cannot import the Python module "torchvision"`},
		{"exec runner without its command", PolicyAuto, makeArchive(t, missingYAML, 0), missingYAML, false, "missing.sh"},
		{"archive over the site's limit", PolicyAuto, makeArchive(t, plan, 4*archiveChunk), plan, false, "over this site's limit"},
		{"offer's plan is not the archive's", PolicyAuto, other, plan, false, "differs from the plan in the offer"},
		{"hyperparameters the builtin model refuses", PolicyAuto, makeArchive(t, strings.Replace(plan, "batch_size: 8", "batch_size: -1", 1), 0), strings.Replace(plan, "batch_size: 8", "batch_size: -1", 1), false, "the offered plan is invalid: invalid plan: runner.hyperparameters"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := fmt.Sprintf("site-p%d", i)
			cfg := testConfig(t, d, name)
			cfg.Review.Policy = tc.policy
			cfg.Exec.Allow = !strings.Contains(tc.name, "refused by the site")
			if strings.Contains(tc.name, "limit") {
				cfg.MaxArchiveBytes = 2 * archiveChunk
			}
			if tc.policy == PolicyAllowlist {
				cfg.Review.Allowlist = allow
			}
			s := startSite(t, cfg, nil)
			id := fmt.Sprintf("exp-%d", i)
			d.push(name, d.offer(id, tc.archive, tc.plan), true)
			a := d.answer(name, id)
			if a.GetAccept() != tc.accept {
				t.Errorf("accept = %v, want %v (reason %q)", a.GetAccept(), tc.accept, a.GetReason())
			}
			mustContain(t, "reason", a.GetReason(), tc.wantReason)
			s.stop(t)
		})
	}
}

func TestManualReviewThroughAdminSocket(t *testing.T) {
	d := newFakeDirector(t)
	cfg := testConfig(t, d, "site-m")
	cfg.Review.Policy = PolicyManual
	s := startSite(t, cfg, nil)
	socket := cfg.AdminSocketPath()

	planA, planB := fmt.Sprintf(softmaxPlan, "study-a"), fmt.Sprintf(softmaxPlan, "study-b")
	archiveA := makeArchive(t, planA, 0)
	d.push("site-m", d.offer("exp-a", archiveA, planA), true)
	d.push("site-m", d.offer("exp-b", makeArchive(t, planB, 0), planB), true)

	ctx := context.Background()
	var pending []PendingOffer
	eventually(t, "two pending offers", func() bool {
		resp, err := AdminCall(ctx, socket, AdminRequest{Command: AdminPending})
		if err != nil {
			t.Fatalf("pending: %v", err)
		}
		pending = resp.Pending
		return len(pending) == 2
	})
	if pending[0].ArchiveSHA256 != digest(archiveA) && pending[1].ArchiveSHA256 != digest(archiveA) {
		t.Errorf("pending offers %+v do not show the archive digest", pending)
	}
	for _, p := range pending {
		mustContain(t, "summary", p.Summary, "2 rounds", "builtin softmax", "fedavg")
	}

	// Waiting for a person blocks nothing: heartbeats go on.
	d.mu.Lock()
	hb := d.heartbeats["site-m"]
	d.mu.Unlock()
	d.waitFor("heartbeats while offers wait", func() bool { return d.heartbeats["site-m"] >= hb+2 })
	d.mu.Lock()
	if len(d.answers) != 0 {
		t.Errorf("answers sent before the owner decided: %v", d.answers)
	}
	d.mu.Unlock()

	// Only the envoy's user can reach the socket.
	if fi, err := os.Stat(socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (err %v), want 0600", fi.Mode().Perm(), err)
	}
	if fi, err := os.Stat(filepath.Dir(socket)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode %v (err %v), want 0700", fi.Mode().Perm(), err)
	}

	if _, err := AdminCall(ctx, socket, AdminRequest{Command: AdminApprove, Experiment: "no-such"}); err == nil || !strings.Contains(err.Error(), "study-a") {
		t.Errorf("approving an unknown name: %v, want an error listing the pending names", err)
	}
	if _, err := AdminCall(ctx, socket, AdminRequest{Command: AdminApprove, Experiment: "study-a"}); err != nil {
		t.Fatalf("approve: %v", err)
	}
	if _, err := AdminCall(ctx, socket, AdminRequest{Command: AdminReject, Experiment: "exp-b", Reason: "not covered by our consent"}); err != nil {
		t.Fatalf("reject: %v", err)
	}
	if a := d.answer("site-m", "exp-a"); !a.GetAccept() || !strings.Contains(a.GetReason(), "data owner") {
		t.Errorf("exp-a answered %v, want accepted by the data owner", a)
	}
	if a := d.answer("site-m", "exp-b"); a.GetAccept() || a.GetReason() != "not covered by our consent" {
		t.Errorf("exp-b answered %v, want rejected with the owner's reason", a)
	}
	resp, err := AdminCall(ctx, socket, AdminRequest{Command: AdminPending})
	if err != nil || len(resp.Pending) != 0 {
		t.Errorf("pending after deciding: %v, %v", resp.Pending, err)
	}
	if _, err := AdminCall(ctx, socket, AdminRequest{Command: "format-disk"}); err == nil {
		t.Error("unknown admin command accepted")
	}
	s.stop(t)
	if _, err := os.Stat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after stop: %v", err)
	}
}

func TestStartRunsCollaboratorAndStopCleans(t *testing.T) {
	d := newFakeDirector(t)
	s := startSite(t, testConfig(t, d, "site-a"), nil)
	plan := fmt.Sprintf(softmaxPlan, "run")
	d.push("site-a", d.offer("exp-r", makeArchive(t, plan, 0), plan), true)
	d.answer("site-a", "exp-r")

	d.push("site-a", startAssignment("exp-r"), true)
	s.collab.waitFor(t, "the collaborator", func() bool { return s.collab.active["exp-r"] })
	d.waitFor("heartbeat listing the experiment", func() bool { return slices.Contains(d.running["site-a"], "exp-r") })
	s.collab.mu.Lock()
	spec := s.collab.starts[0]
	s.collab.mu.Unlock()
	if spec.Name != "site-a" || spec.Address != "127.0.0.1:1" || spec.ServerName != "director" || spec.Plan.Name != "run" {
		t.Errorf("collaborator spec %+v", spec)
	}
	resp, err := AdminCall(context.Background(), s.cfg.AdminSocketPath(), AdminRequest{Command: AdminStatus})
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	st := resp.Status
	if !st.Connected || st.Name != "site-a" || len(st.Experiments) != 1 ||
		st.Experiments[0].Phase != "running" || st.Experiments[0].Aggregator != "127.0.0.1:1" || st.Experiments[0].Name != "run" {
		t.Errorf("status %+v", st)
	}
	// A replayed Start is a no-op.
	d.push("site-a", startAssignment("exp-r"), false)
	d.push("site-a", stopAssignment("exp-r"), false)
	s.collab.waitFor(t, "the collaborator to stop", func() bool { return !s.collab.active["exp-r"] })
	eventually(t, "the work directory to be cleaned", func() bool {
		_, err := os.Stat(filepath.Join(s.cfg.WorkDir, "experiments", "exp-r"))
		return errors.Is(err, os.ErrNotExist)
	})
	s.collab.mu.Lock()
	defer s.collab.mu.Unlock()
	if len(s.collab.starts) != 1 {
		t.Errorf("%d collaborators started, want 1 (replayed Start is a no-op)", len(s.collab.starts))
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.failures) != 0 {
		t.Errorf("failures reported for a stopped experiment: %v", d.failures)
	}
}

func TestCollaboratorFailureReported(t *testing.T) {
	d := newFakeDirector(t)
	s := startSite(t, testConfig(t, d, "site-a"), nil)
	plan := fmt.Sprintf(softmaxPlan, "fails")
	d.push("site-a", d.offer("exp-f", makeArchive(t, plan, 0), plan), true)
	d.answer("site-a", "exp-f")
	d.push("site-a", startAssignment("exp-f"), true)
	s.collab.waitFor(t, "the collaborator", func() bool { return s.collab.active["exp-f"] })
	// It fails in round 3, though it started in round 1: the report names
	// round 3, once, in its round field (the director prefixes it).
	s.collab.finishCh("exp-f") <- &collaborator.RoundError{Round: 3, Err: errors.New("task train: out of memory")}
	d.waitFor("a failure report", func() bool { return len(d.failures) == 1 })
	d.mu.Lock()
	f := d.failures[0]
	d.mu.Unlock()
	if f.GetExperimentId() != "exp-f" || f.GetReason() != "task train: out of memory" || f.GetRound() != 3 {
		t.Errorf("failure %v, want round 3 and the reason without a round", f)
	}
	// Start for an experiment never accepted is reported too.
	d.push("site-a", startAssignment("exp-unknown"), false)
	d.waitFor("a second failure report", func() bool { return len(d.failures) == 2 })
	d.mu.Lock()
	defer d.mu.Unlock()
	mustContain(t, "reason", d.failures[1].GetReason(), "no record of accepting")
}

func TestRejoinsAfterEnvoyRestart(t *testing.T) {
	d := newFakeDirector(t)
	cfg := testConfig(t, d, "site-a")
	first := startSite(t, cfg, nil)
	plan := fmt.Sprintf(softmaxPlan, "long")
	d.push("site-a", d.offer("exp-l", makeArchive(t, plan, 2*archiveChunk), plan), true)
	d.answer("site-a", "exp-l")
	// Once running, the director replays Start (not the answered offer).
	d.setReplay("site-a", startAssignment("exp-l"))
	d.push("site-a", startAssignment("exp-l"), false)
	first.collab.waitFor(t, "the first collaborator", func() bool { return first.collab.active["exp-l"] })

	first.stop(t)
	first.collab.waitFor(t, "the first collaborator to end", func() bool { return !first.collab.active["exp-l"] })
	d.mu.Lock()
	downloads, streams := len(d.downloads), d.streams["site-a"]
	d.mu.Unlock()

	second := startSite(t, cfg, nil)
	second.collab.waitFor(t, "the collaborator to rejoin", func() bool { return second.collab.active["exp-l"] })
	d.waitFor("heartbeat listing the experiment", func() bool {
		return d.streams["site-a"] > streams && slices.Contains(d.running["site-a"], "exp-l")
	})
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.downloads) != downloads {
		t.Errorf("rejoining downloaded the archive again: %v", d.downloads)
	}
	if len(d.failures) != 0 {
		t.Errorf("stopping the envoy reported failures: %v", d.failures)
	}
	second.collab.mu.Lock()
	defer second.collab.mu.Unlock()
	if got := second.collab.starts[0]; got.Plan.Name != "long" || got.Address != "127.0.0.1:1" {
		t.Errorf("rejoined with %+v", got)
	}
}

func TestTwoEnvoysHoldDifferentIDXShards(t *testing.T) {
	d := newFakeDirector(t)
	dir := writeIDX(t, 40, 10)
	for i, name := range []string{"site-1", "site-2"} {
		cfg := testConfig(t, d, name)
		cfg.Shard = idxShard(dir, fmt.Sprintf("%d/2", i+1))
		cfg.Tags = []string{"tiny-idx"}
		startSite(t, cfg, nil)
	}
	d.waitFor("both registrations", func() bool { return d.registered["site-1"] != nil && d.registered["site-2"] != nil })
	d.mu.Lock()
	defer d.mu.Unlock()
	total := int64(0)
	for i, name := range []string{"site-1", "site-2"} {
		sh := d.registered[name].GetShard()
		if !slices.Equal(sh.GetSampleShape(), []int64{3, 3}) || sh.GetClasses() != 4 {
			t.Errorf("%s: shape %v classes %d", name, sh.GetSampleShape(), sh.GetClasses())
		}
		// Each holds half of the 40 training images, of which the
		// default valid_fraction (0.2) is held out for validation; the 10
		// test images are a split of their own that no runner gets.
		if sh.GetTrainSamples() != 16 || sh.GetValidSamples() != 4 {
			t.Errorf("%s: %d+%d samples, want 16+4", name, sh.GetTrainSamples(), sh.GetValidSamples())
		}
		mustContain(t, name+" description", sh.GetDescription(), fmt.Sprintf("shard %d/2", i+1))
		total += sh.GetTrainSamples()
	}
	if total != 32 {
		t.Errorf("shards hold %d training samples together, want 32 (40 less the validation split)", total)
	}
}

func TestStartupFailures(t *testing.T) {
	d := newFakeDirector(t)
	p := getPKI(t)
	researcher := p.files(t, pki.RoleResearcher, "rita")
	idxDir := writeIDX(t, 10, 4)
	tests := []struct {
		name   string
		mutate func(*Config)
		want   []string
	}{
		{"missing data files", func(c *Config) { c.Shard = idxShard(filepath.Join(t.TempDir(), "nowhere"), "") }, []string{"shard", "nowhere"}},
		{"malformed data file", func(c *Config) {
			os.WriteFile(filepath.Join(idxDir, "t10k-labels-idx1-ubyte"), []byte("garbage"), 0o600)
			c.Shard = idxShard(idxDir, "")
		}, []string{"shard", "t10k-labels"}},
		{"certificate of another role", func(c *Config) {
			c.TLS = TLSConfig{Cert: researcher.Cert, Key: researcher.Key, CA: researcher.CA}
		}, []string{`role "researcher"`, "envoy"}},
		{"name is not the CN", func(c *Config) { c.Name = "site-b" }, []string{"site-b", "site-a", "CN"}},
		{"missing certificate", func(c *Config) { c.TLS.Cert = filepath.Join(t.TempDir(), "none.crt") }, []string{"none.crt"}},
		{"no director", func(c *Config) { c.Director.Address = "" }, []string{"director.address"}},
		{"bad policy", func(c *Config) { c.Review.Policy = "maybe" }, []string{`review.policy "maybe"`}},
		{"allowlist without file", func(c *Config) { c.Review.Policy = PolicyAllowlist }, []string{"review.allowlist"}},
		{"allowlist with a bad line", func(c *Config) {
			f := filepath.Join(t.TempDir(), "allow")
			os.WriteFile(f, []byte("not-a-digest\n"), 0o600)
			c.Review = ReviewConfig{Policy: PolicyAllowlist, Allowlist: f}
		}, []string{"line 1", "not-a-digest"}},
		{"zero max_experiments", func(c *Config) { c.MaxExperiments = 0 }, []string{"max_experiments"}},
		{"bad shard", func(c *Config) { c.Shard.Shard = "3/2" }, []string{"shard", "3/2"}},
		{"protocol variable in exec.env", func(c *Config) { c.Exec.Env = []string{"FX_TASK=x"} }, []string{"exec.env[0]", "FX_TASK"}},
		{"relative exec.python", func(c *Config) { c.Exec.Python = "venv/bin/python3" }, []string{"exec.python", "absolute"}},
		{"too many tags", func(c *Config) {
			c.Tags = make([]string, 33)
			for i := range c.Tags {
				c.Tags[i] = "t"
			}
		}, []string{"33 tags", "at most 32"}},
		{"long tag", func(c *Config) { c.Tags = []string{strings.Repeat("x", 65)} }, []string{"tags[0]", "65 bytes"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, d, "site-a")
			tc.mutate(&cfg)
			_, err := New(cfg)
			if err == nil {
				t.Fatal("New succeeded")
			}
			mustContain(t, "error", err.Error(), tc.want...)
		})
	}
}

func TestSecondEnvoyOnSameSocketRefused(t *testing.T) {
	d := newFakeDirector(t)
	cfg := testConfig(t, d, "site-a")
	startSite(t, cfg, nil)
	d.waitFor("registration", func() bool { return d.registered["site-a"] != nil })
	cfg.RunCollaborator = newFakeCollaborators().run
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	err = e.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second envoy on the same work_dir: %v, want the socket in use", err)
	}
}

func TestPendingOfferSurvivesEnvoyRestart(t *testing.T) {
	d := newFakeDirector(t)
	cfg := testConfig(t, d, "site-m")
	cfg.Review.Policy = PolicyManual
	first := startSite(t, cfg, nil)
	plan := fmt.Sprintf(softmaxPlan, "waiting")
	d.push("site-m", d.offer("exp-w", makeArchive(t, plan, 3*archiveChunk), plan), true)
	eventually(t, "the offer to be pending", func() bool { return len(first.envoy.Pending()) == 1 })
	first.stop(t)

	second := startSite(t, cfg, nil)
	var pending []PendingOffer
	eventually(t, "the replayed offer to be pending again", func() bool {
		resp, err := AdminCall(context.Background(), cfg.AdminSocketPath(), AdminRequest{Command: AdminPending})
		pending = resp.Pending
		return err == nil && len(pending) == 1
	})
	if pending[0].ID != "exp-w" || pending[0].Name != "waiting" {
		t.Errorf("pending after restart: %+v", pending)
	}
	if _, err := second.envoy.Decide("alice/waiting", true, ""); err != nil {
		t.Fatalf("Decide: %v", err)
	}
	if a := d.answer("site-m", "exp-w"); !a.GetAccept() {
		t.Errorf("answer %v", a)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.downloads) != 1 {
		t.Errorf("downloads %v, want the archive downloaded once across the restart", d.downloads)
	}
}

// TestStartWithNewServerNameRestartsCollaborator: a Start naming another
// certificate for the aggregator cannot be followed by the running
// collaborator's connection (it checks the old name): it is restarted.
func TestStartWithNewServerNameRestartsCollaborator(t *testing.T) {
	d := newFakeDirector(t)
	s := startSite(t, testConfig(t, d, "site-a"), nil)
	plan := fmt.Sprintf(softmaxPlan, "moved")
	d.push("site-a", d.offer("exp-m", makeArchive(t, plan, 0), plan), true)
	d.answer("site-a", "exp-m")
	d.push("site-a", startAssignment("exp-m"), false)
	s.collab.waitFor(t, "the collaborator", func() bool { return s.collab.active["exp-m"] })

	moved := startAssignment("exp-m")
	moved.GetStart().AggregatorAddress = "127.0.0.1:2"
	moved.GetStart().AggregatorServerName = "aggregators.example"
	moved.GetStart().Round = 4
	d.push("site-a", moved, false)
	s.collab.waitFor(t, "a second collaborator", func() bool {
		return len(s.collab.starts) == 2 && s.collab.active["exp-m"]
	})
	s.collab.mu.Lock()
	defer s.collab.mu.Unlock()
	if got := s.collab.starts[1]; got.Address != "127.0.0.1:2" || got.ServerName != "aggregators.example" || got.Round != 4 {
		t.Errorf("restarted collaborator spec %+v", got)
	}
}

func TestExperimentEndedWhileEnvoyWasAwayIsCleanedUp(t *testing.T) {
	d := newFakeDirector(t)
	cfg := testConfig(t, d, "site-a")
	first := startSite(t, cfg, nil)
	plan := fmt.Sprintf(softmaxPlan, "gone")
	d.push("site-a", d.offer("exp-g", makeArchive(t, plan, 0), plan), true)
	d.answer("site-a", "exp-g")
	d.setReplay("site-a")
	d.push("site-a", startAssignment("exp-g"), false)
	first.collab.waitFor(t, "the collaborator", func() bool { return first.collab.active["exp-g"] })
	first.stop(t)

	d.update(func() { d.ended["exp-g"] = true })
	second := startSite(t, cfg, nil)
	eventually(t, "the ended experiment's files to be removed", func() bool {
		_, err := os.Stat(filepath.Join(cfg.WorkDir, "experiments", "exp-g"))
		return errors.Is(err, os.ErrNotExist)
	})
	d.waitFor("heartbeats without the experiment", func() bool { return len(d.running["site-a"]) == 0 })
	second.collab.mu.Lock()
	defer second.collab.mu.Unlock()
	if len(second.collab.starts) != 0 {
		t.Errorf("collaborator started for an ended experiment")
	}
}

func TestRecordedDecisionSentAgainAfterRestart(t *testing.T) {
	tests := []struct {
		name     string
		decision string
		accept   bool
	}{
		{"rejection", decisionReject, false},
		{"acceptance", decisionAccept, true},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := newFakeDirector(t)
			cfg := testConfig(t, d, "site-a")
			id := fmt.Sprintf("exp-d%d", i)
			plan := fmt.Sprintf(softmaxPlan, "decided")
			offer := d.offer(id, makeArchive(t, plan, 0), plan)
			// An earlier envoy decided and died before the answer reached
			// the director.
			o := offer.GetOffer()
			rec := record{ID: id, Name: o.GetName(), Owner: o.GetOwner(), ArchiveSize: o.GetArchiveSize(),
				ArchiveSHA256: o.GetArchiveSha256(), PlanYAML: plan, Decision: tc.decision, Reason: "decided before the crash"}
			e := &Envoy{cfg: cfg}
			if err := e.saveRecord(rec); err != nil {
				t.Fatal(err)
			}
			if tc.accept {
				files := filepath.Join(cfg.WorkDir, "experiments", id, filesDir)
				os.MkdirAll(files, 0o700)
				os.WriteFile(filepath.Join(files, "plan.yaml"), []byte(plan), 0o600)
			}
			startSite(t, cfg, nil)
			d.push("site-a", offer, true)
			a := d.answer("site-a", id)
			if a.GetAccept() != tc.accept || a.GetReason() != "decided before the crash" {
				t.Errorf("answer %v, want the recorded decision", a)
			}
			d.mu.Lock()
			if len(d.downloads) != 0 {
				t.Errorf("a decided offer was downloaded again: %v", d.downloads)
			}
			d.mu.Unlock()
			dir := filepath.Join(cfg.WorkDir, "experiments", id)
			if tc.accept {
				if _, err := os.Stat(dir); err != nil {
					t.Errorf("an accepted experiment's directory is gone: %v", err)
				}
				return
			}
			eventually(t, "the rejected experiment's directory to go", func() bool {
				_, err := os.Stat(dir)
				return errors.Is(err, os.ErrNotExist)
			})
		})
	}
}
