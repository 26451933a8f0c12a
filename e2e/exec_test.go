package e2e

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// execPlan runs ./run.sh at the sites named, a process per task.
func execPlan(name, participants string) string {
	return fmt.Sprintf(`name: %s
rounds: 2
participants: %s
runner: {kind: exec, command: [./run.sh], mode: per_task, timeout: 1m}
stragglers: {deadline: 1m, min_reporting: 1}
`, name, participants)
}

// writeSoftmaxModel writes a zero softmax model for the synthetic data
// (16 features, 4 classes) as dir/model.safetensors.
func writeSoftmaxModel(t *testing.T, dir string) {
	t.Helper()
	f32 := func(name string, shape ...int64) *tensor.Tensor {
		n := tensor.Elements(shape)
		data := make([]byte, 4*n)
		for i := range n {
			binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(0))
		}
		return &tensor.Tensor{Name: name, DType: tensor.F32, Shape: shape, Data: data}
	}
	m := tensor.Model{f32("fc0.weight", 4, 16), f32("fc0.bias", 4)}
	if err := tensor.WriteFile(filepath.Join(dir, "model.safetensors"), m, nil); err != nil {
		t.Fatal(err)
	}
}

// TestExecFailures: what a researcher sees when an exec experiment cannot
// run: an archive without the initial model an exec runner needs, a site
// that does not run experiments' own code, and a runner that crashes. Each
// ends FAILED with a reason that names the cause, and the sites clean up.
func TestExecFailures(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2", "site-3"})
	f.startDirector(directorOptions{})
	f.startEnvoyOpts("site-1", syntheticShard(1, 3, ""), envoyOptions{shareLogs: true})
	f.startEnvoy("site-2", syntheticShard(2, 3, ""))
	f.startEnvoyOpts("site-3", syntheticShard(3, 3, ""), envoyOptions{noExec: true})
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2", "site-3")
	crash := "#!/bin/sh\necho 'run.sh: error: the GPU caught fire' >&2\nexit 3\n"

	t.Run("no initial model", func(t *testing.T) {
		f := f.sub(t)
		dir := writePlan(t, execPlan("no-model", "{min: 2, envoys: [site-1, site-2]}"))
		if err := os.WriteFile(filepath.Join(dir, "run.sh"), []byte(crash), 0o755); err != nil {
			t.Fatal(err)
		}
		// Refused at once, by the CLI before it uploads anything (the
		// director refuses such an archive too): it could never
		// start, and sites would download and review it for nothing.
		r := f.exp("alice", "submit", dir)
		if r.err == nil || !strings.Contains(r.stderr, "model.safetensors") || !strings.Contains(r.stderr, "needs the initial model") {
			t.Errorf("submitting an exec experiment without model.safetensors: %v %q, want a refusal naming model.safetensors", r.err, r.stderr)
		} else {
			t.Logf("refused: %s", strings.TrimSpace(r.stderr))
		}
		if list, err := c.List(context.Background()); err != nil || len(list) != 0 {
			t.Errorf("experiments after the refusal: %v (%v)", list, err)
		}
	})

	t.Run("a site that runs no experiment code", func(t *testing.T) {
		f := f.sub(t)
		dir := writePlan(t, execPlan("refused", "{min: 1, envoys: [site-3], accept_timeout: 2s}"))
		writeSoftmaxModel(t, dir)
		if err := os.WriteFile(filepath.Join(dir, "run.sh"), []byte(crash), 0o755); err != nil {
			t.Fatal(err)
		}
		f.submit("alice", dir)
		e := f.waitState(c, "refused", time.Minute, fxv1.ExperimentState_FAILED)
		p := participant(e, "site-3")
		t.Logf("site-3: %s %s; experiment: %s", p.GetState(), p.GetReason(), e.GetReason())
		if p.GetState() != fxv1.ParticipantState_DECLINED || !strings.Contains(p.GetReason(), "exec") {
			t.Errorf("site-3: %v, want DECLINED with a reason naming exec", p)
		}
	})

	// site-1 shares its runners' output: the researcher reads why the
	// runner failed, in the reasons and in the runner logs.
	t.Run("a crashing runner", func(t *testing.T) {
		f := f.sub(t)
		dir := writePlan(t, execPlan("crashing", "{min: 1, envoys: [site-1]}"))
		writeSoftmaxModel(t, dir)
		if err := os.WriteFile(filepath.Join(dir, "run.sh"), []byte(crash), 0o755); err != nil {
			t.Fatal(err)
		}
		e := f.submit("alice", dir)
		final := f.waitState(c, "crashing", time.Minute, fxv1.ExperimentState_FAILED)
		t.Logf("experiment: %s", final.GetReason())
		checkEndedParticipants(t, final)
		if p := participant(final, "site-1"); !strings.Contains(final.GetReason()+p.GetReason(), "GPU caught fire") {
			t.Errorf("neither the experiment's reason nor site-1's carries the runner's error: %q, %v", final.GetReason(), p)
		}
		logs := f.mustExp("alice", "logs", "crashing")
		if !strings.Contains(logs, "site-1") || !strings.Contains(logs, "stderr: run.sh: error: the GPU caught fire") {
			t.Errorf("fx experiment logs:\n%s", logs)
		}
		dir = filepath.Join(f.dir, "envoys", "site-1", "experiments", e.GetId())
		f.waitFor(30*time.Second, "site-1 to delete its copy", func() (bool, error) {
			_, err := os.Stat(dir)
			return os.IsNotExist(err), err
		})
	})

	// site-2 does not share: what the runner printed stays at the site,
	// and the researcher gets fx's own words.
	t.Run("runner output stays at a site that does not share it", func(t *testing.T) {
		f := f.sub(t)
		dir := writePlan(t, execPlan("private", "{min: 1, envoys: [site-2]}"))
		writeSoftmaxModel(t, dir)
		if err := os.WriteFile(filepath.Join(dir, "run.sh"), []byte(crash), 0o755); err != nil {
			t.Fatal(err)
		}
		f.submit("alice", dir)
		final := f.waitState(c, "private", time.Minute, fxv1.ExperimentState_FAILED)
		reasons := final.GetReason()
		for _, p := range final.GetParticipants() {
			reasons += "\n" + p.GetReason()
		}
		t.Logf("reasons: %s", reasons)
		if strings.Contains(reasons, "GPU") || !strings.Contains(reasons, "exited with status 3") || !strings.Contains(reasons, "share_logs") {
			t.Errorf("reasons %q: want fx's words (the exit status, share_logs) and nothing the runner printed", reasons)
		}
		if logs := f.mustExp("alice", "logs", "private"); strings.Contains(logs, "GPU") {
			t.Errorf("fx experiment logs shows a site's output it does not share:\n%s", logs)
		}
		if !strings.Contains(f.envoys["site-2"].log(), "GPU caught fire") {
			t.Error("site-2's own log lacks what its runner printed")
		}
	})
}

// runnerProcesses lists the processes whose working directory lies under
// dir: the exec runner commands an envoy with that work directory started.
func runnerProcesses(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cwd, err := os.Readlink(filepath.Join("/proc", e.Name(), "cwd"))
		if err == nil && strings.HasPrefix(cwd, dir+string(filepath.Separator)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestExecRunnerDiesWithEnvoy: when an envoy dies (SIGKILL) while the
// experiment's own command runs a task, the command does not run on
// unsupervised: it is gone within seconds, before a restarted envoy would
// start the task again.
func TestExecRunnerDiesWithEnvoy(t *testing.T) {
	if _, err := os.Stat("/proc/self/cwd"); err != nil {
		t.Skip("needs /proc to find the runner's processes")
	}
	f := newFed(t, []string{"alice"}, []string{"site-1"})
	f.startDirector(directorOptions{})
	victim := f.startEnvoy("site-1", syntheticShard(1, 1, ""))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1")

	dir := writePlan(t, execPlan("sleepy", "{min: 1, envoys: [site-1]}"))
	writeSoftmaxModel(t, dir)
	// Every task takes five minutes.
	if err := os.WriteFile(filepath.Join(dir, "run.sh"), []byte("#!/bin/sh\nexec sleep 300\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	f.submit("alice", dir)
	work, err := filepath.EvalSymlinks(filepath.Join(f.dir, "envoys", "site-1"))
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	f.waitFor(time.Minute, "the runner command to start", func() (bool, error) {
		pids = runnerProcesses(work)
		return len(pids) > 0, nil
	})
	t.Cleanup(func() {
		for _, pid := range runnerProcesses(work) {
			if p, err := os.FindProcess(pid); err == nil {
				_ = p.Kill()
			}
		}
	})
	victim.kill(t)
	deadline := time.Now().Add(10 * time.Second)
	for len(runnerProcesses(work)) > 0 && time.Now().Before(deadline) {
		<-time.After(100 * time.Millisecond)
	}
	if left := runnerProcesses(work); len(left) > 0 {
		t.Errorf("the runner command (pids %v) still runs 10s after its envoy died", left)
	}

	// Restarted, the envoy runs the task again; stopped gracefully, it
	// stops the command and exits cleanly (stop checks both).
	victim.start(t)
	f.waitFor(time.Minute, "the runner command to start again", func() (bool, error) {
		for _, pid := range runnerProcesses(work) {
			if !slices.Contains(pids, pid) {
				return true, nil
			}
		}
		return false, nil
	})
	start := time.Now()
	victim.stop(t)
	t.Logf("the envoy stopped %s after SIGTERM", time.Since(start).Round(time.Millisecond))
	if left := runnerProcesses(work); len(left) > 0 {
		t.Errorf("the runner command (pids %v) outlived its envoy's graceful stop", left)
	}
}

// TestMismatchedShards: two sites whose data differ in shape cannot train
// one built-in model; the experiment fails with a reason naming both sites'
// shapes rather than training garbage or hanging.
func TestMismatchedShards(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"narrow", "wide"})
	f.startDirector(directorOptions{})
	f.startEnvoy("narrow", syntheticShard(1, 2, "features: 16\n"))
	f.startEnvoy("wide", syntheticShard(2, 2, "features: 32\n"))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "narrow", "wide")
	f.submit("alice", writePlan(t, syntheticPlan("mismatch", 2, "", "")))
	e := f.waitState(c, "mismatch", time.Minute, fxv1.ExperimentState_FAILED)
	t.Logf("reason: %s", e.GetReason())
	for _, s := range []string{"narrow", "wide", "16", "32"} {
		if !strings.Contains(e.GetReason(), s) {
			t.Errorf("the reason does not name %q", s)
		}
	}
	checkEndedParticipants(t, e)
}
