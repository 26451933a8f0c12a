package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// TestDirectorOutage: the director (and its aggregator) is killed mid-
// experiment and comes back after 10s, 60s and 120s, with an 8s
// stragglers deadline and both sites' reports required in every round. The
// envoys (retry.max 1s) find it again within seconds of its return, not on
// gRPC's own reconnection schedule of up to 2 minutes; the resumed round
// waits for them (the rejoin grace) instead of closing at its deadline with
// no report; and the experiment finishes with every round reported by
// both sites. The outages run side by side (they are mostly waiting): the
// 120s one sets how long the test takes. The 60s one uses ephemeral
// aggregator ports (the default), so the collaborators follow a moved
// aggregator; the others one fixed port, so they reconnect to the same
// address.
func TestDirectorOutage(t *testing.T) {
	requireE2E(t)
	for _, tc := range []struct {
		outage   time.Duration
		fixedAgg bool
	}{
		{120 * time.Second, true},
		{60 * time.Second, false},
		{10 * time.Second, true},
	} {
		t.Run(fmt.Sprintf("%.0fs", tc.outage.Seconds()), func(t *testing.T) {
			t.Parallel()
			testDirectorOutage(t, tc.outage, tc.fixedAgg)
		})
	}
}

func testDirectorOutage(t *testing.T, outage time.Duration, fixedAgg bool) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{fixedAggPort: fixedAgg})
	for i, name := range []string{"site-1", "site-2"} {
		f.startEnvoy(name, syntheticShard(i+1, 2, "features: 64\ntrain_samples: 16000\nvalid_samples: 1000\n"))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	const rounds = 30
	f.submit("alice", writePlan(t, syntheticPlan("outage", rounds, "hidden: [64], lr: 0.05, batch_size: 64, epochs: 2", "deadline: 8s, min_reporting: 2")))
	var killRound int32
	f.waitFor(2*time.Minute, "round 2", func() (bool, error) {
		e, err := getExp(c, "outage")
		if err != nil {
			return false, err
		}
		if experiment.Ended(e.GetState()) || e.GetRound() >= rounds {
			t.Fatalf("experiment %s at round %d before the outage: make rounds slower", e.GetState(), e.GetRound())
		}
		killRound = e.GetRound()
		return e.GetState() == fxv1.ExperimentState_RUNNING && killRound >= 2, fmt.Errorf("%s, round %d", e.GetState(), killRound)
	})
	f.director.kill(t)
	t.Logf("killed the director in round %d; down for %s", killRound, outage)
	<-time.After(outage) // the outage itself

	f.restartDirector()
	back := time.Now()
	f.waitEnvoysOnline(c, "site-1", "site-2")
	online := time.Since(back)
	t.Logf("both envoys online %s after the director came back", online.Round(10*time.Millisecond))
	// retry.max is 1s and heartbeats come every second: a few seconds at
	// most, on a loaded machine. gRPC's own backoff is 40s or more by now.
	if limit := 15 * time.Second; online > limit {
		t.Errorf("the envoys came back %s after the director, more than %s with retry.max 1s", online.Round(time.Second), limit)
	}
	e := f.waitState(c, "outage", 3*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("finished %s after the director came back", time.Since(back).Round(100*time.Millisecond))
	if e.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", e.GetRound(), rounds)
	}
	resumed := false
	for _, line := range logLinesAfter(f.director.log(), 2) {
		resumed = resumed || strings.Contains(line, "round started:") && logField(line, "resumed") == "true"
	}
	if !resumed {
		t.Error("the director's log has no resumed round after the restart")
	}
	evs := f.watchEvents("alice", "outage")
	checkSequences(t, evs)
	for r := 1; r <= rounds; r++ {
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, []string{"site-1", "site-2"}) {
			t.Errorf("round %d: train reported by %v, want both sites once", r, got)
		}
	}
}

// tasksDone counts an envoy's "task done" log lines for a round and task.
func tasksDone(log string, round int32, task string) int {
	n := 0
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, "task done") && logField(line, "round") == fmt.Sprint(round) && logField(line, "task") == task {
			n++
		}
	}
	return n
}

// TestRestartResumesRoundWhereSitesStand: the director is killed in a
// round after "fast" has reported every task of it and while "slow" is
// training. Restarted, it serves the experiment from an aggregator on a new
// port. Neither site computes anything of that round again: fast sends the
// results it had kept, trained weights included, and slow's collaborator,
// moved to the new aggregator rather than restarted, finishes the training
// it was doing and sends it.
func TestRestartResumesRoundWhereSitesStand(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"fast", "slow"})
	f.startDirector(directorOptions{})
	f.startEnvoy("fast", syntheticShard(1, 2, "features: 64\ntrain_samples: 10000\nvalid_samples: 2000\n"))
	slow := f.startEnvoy("slow", syntheticShard(1, 2, "features: 64\ntrain_samples: 60000\nvalid_samples: 2000\n"))
	fast := f.envoys["fast"]
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "fast", "slow")

	const rounds = 3
	f.submit("alice", writePlan(t, syntheticPlan("stand", rounds, slowHyper, "deadline: 2m, min_reporting: 2")))
	var killRound int32
	f.waitFor(2*time.Minute, "fast to have reported a round in which slow trains", func() (bool, error) {
		e, err := getExp(c, "stand")
		if err != nil {
			return false, err
		}
		r := e.GetRound()
		if experiment.Ended(e.GetState()) || r >= rounds {
			t.Fatalf("experiment %s in round %d before the moment came", e.GetState(), r)
		}
		log := slow.log()
		if e.GetState() == fxv1.ExperimentState_RUNNING && participant(e, "fast").GetLastRound() == r && tasksDone(log, r, runner.TaskAggregatedValidation) == 1 && tasksDone(log, r, runner.TaskTrain) == 0 {
			killRound = r
			return true, nil
		}
		return false, nil
	})
	f.director.kill(t)
	t.Logf("killed the director in round %d: fast had reported it, slow was training", killRound)
	f.restartDirector()
	f.waitState(c, "stand", 3*time.Minute, fxv1.ExperimentState_FINISHED)

	for _, site := range []*proc{fast, slow} {
		log := site.log()
		for _, task := range []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation} {
			if n := tasksDone(log, killRound, task); n != 1 {
				t.Errorf("%s computed %s of round %d %d times, want once", site.name, task, killRound, n)
			}
		}
		if n := strings.Count(log, "starting the collaborator"); n != 1 {
			t.Errorf("%s started its collaborator %d times, want once: it should follow the moved aggregator", site.name, n)
		}
		if !strings.Contains(log, "the aggregator moved; the collaborator follows it") {
			t.Errorf("%s's log does not say it followed the moved aggregator", site.name)
		}
	}
	if !strings.Contains(fast.log(), "sending results computed before") {
		t.Error("fast's log does not say it sent the results it had kept")
	}
	evs := f.watchEvents("alice", "stand")
	checkSequences(t, evs)
	for r := 1; r <= rounds; r++ {
		for _, task := range []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation} {
			if got := reporters(evs, r, task); !slices.Equal(got, []string{"fast", "slow"}) {
				t.Errorf("round %d %s: reported by %v, want each site once", r, task, got)
			}
		}
	}
}

// TestFailedSiteIsLeftBehind: three sites accept an experiment whose plan
// needs two (participants.min); at one of them the runner is killed as the
// kernel's OOM killer would (SIGKILL). All three take part, the failed site
// is dropped with the round and a reason that reads right, the other two
// finish the experiment, and the record says who dropped out and why.
func TestFailedSiteIsLeftBehind(t *testing.T) {
	requireE2E(t)
	if out, err := exec.Command(systemPython, "-c", "import numpy").CombinedOutput(); err != nil {
		t.Skipf("%s cannot import numpy (apt-get install python3-numpy): %v %s", systemPython, err, out)
	}
	exp := t.TempDir()
	runnerPy, err := os.ReadFile(filepath.Join("..", "examples", "python-runner", "runner.py"))
	if err != nil {
		t.Fatal(err)
	}
	// run.sh is the runner at every site; where E2E_RUNNER_OOM is set it
	// dies by SIGKILL, as an OOM-killed process does.
	files := map[string]string{
		"runner.py": string(runnerPy),
		"run.sh":    "#!/bin/sh\nif [ -n \"$E2E_RUNNER_OOM\" ]; then kill -9 $$; fi\nexec python3 runner.py \"$@\"\n",
		"plan.yaml": `name: three-sites
rounds: 2
participants: {min: 2, tags: [synthetic]}
runner: {kind: exec, command: [sh, run.sh], mode: per_task, timeout: 5m, hyperparameters: {lr: 0.05, batch_size: 64, epochs: 1}}
stragglers: {deadline: 5m, min_reporting: 2}
`,
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(exp, name), []byte(body), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	sdk, err := filepath.Abs(filepath.Join("..", "sdk", "python"))
	if err != nil {
		t.Fatal(err)
	}
	init := exec.Command(systemPython, "runner.py", "init", "--features", "16", "--classes", "4")
	init.Dir = exp
	init.Env = append(os.Environ(), "PYTHONPATH="+sdk, "PYTHONDONTWRITEBYTECODE=1")
	if out, err := init.CombinedOutput(); err != nil {
		t.Fatalf("runner.py init: %v\n%s", err, out)
	}

	sites := []string{"site-1", "site-2", "site-3"}
	f := newFed(t, []string{"alice"}, sites)
	f.startDirector(directorOptions{})
	for i, name := range sites {
		o := envoyOptions{}
		if name == "site-3" {
			o.execEnv = []string{"E2E_RUNNER_OOM=1"}
		}
		f.startEnvoyOpts(name, syntheticShard(i+1, 3, ""), o)
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	f.submit("alice", exp)
	e := f.waitState(c, "three-sites", 5*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("finished: %q", e.GetReason())
	want := map[string]fxv1.ParticipantState{"site-1": fxv1.ParticipantState_COMPLETED, "site-2": fxv1.ParticipantState_COMPLETED, "site-3": fxv1.ParticipantState_DROPPED}
	for name, state := range want {
		if p := participant(e, name); p.GetState() != state {
			t.Errorf("%s ended %v, want %s", name, p, state)
		}
	}
	reason := participant(e, "site-3").GetReason()
	t.Logf("site-3: %s", reason)
	if !regexp.MustCompile(`^round 1: task \w+: .*signal 9`).MatchString(reason) || strings.Contains(reason, "round 1: round") {
		t.Errorf("site-3's reason %q, want 'round 1: task NAME: ...' naming the signal, the round once", reason)
	}
	if !strings.Contains(e.GetReason(), "site-3 (round 1: task") {
		t.Errorf("the experiment's reason %q does not say that site-3 dropped out and why", e.GetReason())
	}
	evs := f.watchEvents("alice", "three-sites")
	for r := 1; r <= 2; r++ {
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, []string{"site-1", "site-2"}) {
			t.Errorf("round %d: train reported by %v, want site-1 and site-2", r, got)
		}
	}
}
