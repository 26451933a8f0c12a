package e2e

import (
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestPersistentPythonRunner runs the reference Python runner (written on
// fx.site, which every envoy hands its runners) through real fx processes
// for five rounds: one runner process per site serves every task after the
// one start at review, and the output of the site that shares it reaches
// the researcher.
func TestPersistentPythonRunner(t *testing.T) {
	if err := osexec.Command("/usr/bin/python3", "-c", "import numpy").Run(); err != nil {
		t.Skipf("/usr/bin/python3 cannot import numpy (%v): apt-get install python3-numpy", err)
	}
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	f.startEnvoyOpts("site-1", syntheticShard(1, 2, ""), envoyOptions{shareLogs: true})
	f.startEnvoy("site-2", syntheticShard(2, 2, ""))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	dir := writePlan(t, `name: numpy-softmax
rounds: 5
participants: {min: 2, envoys: [site-1, site-2]}
runner: {kind: exec, command: [python3, runner.py], timeout: 2m, hyperparameters: {lr: 0.1, epochs: 1}}
stragglers: {deadline: 2m, min_reporting: 2}
`)
	writeSoftmaxModel(t, dir)
	src, err := os.ReadFile("../examples/python-runner/runner.py")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "runner.py"), src, 0o644); err != nil {
		t.Fatal(err)
	}
	f.submit("alice", dir)
	e := f.waitState(c, "numpy-softmax", 3*time.Minute, fxv1.ExperimentState_FINISHED)
	if acc := e.GetBest().GetValue(); e.GetBest().GetMetric() != "accuracy" || acc < 0.6 {
		t.Errorf("best accuracy %.3f after 5 rounds of softmax regression on separable clusters, want ≥ 0.6", acc)
	}
	for _, site := range []string{"site-1", "site-2"} {
		log := f.envoys[site].log()
		var review, serving int
		for line := range strings.SplitSeq(log, "\n") {
			if !strings.Contains(line, "runner process ready") {
				continue
			}
			if strings.Contains(line, "check=true") {
				review++
			} else {
				serving++
			}
		}
		// 5 rounds × 3 tasks + the final validation: one process.
		if review != 1 || serving != 1 {
			t.Errorf("%s started its runner %d times at review and %d times for 16 tasks, want 1 and 1", site, review, serving)
		}
	}
	logs := f.mustExp("alice", "logs", "numpy-softmax")
	if !strings.Contains(logs, "site-1  train r1  stderr: epoch 1/1: loss") {
		t.Errorf("fx experiment logs lacks site-1's training progress:\n%s", logs)
	}
	if strings.Contains(logs, "site-2") {
		t.Errorf("fx experiment logs shows site-2, which does not share its runners' output:\n%s", logs)
	}
}
