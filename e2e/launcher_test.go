package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/director"
	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// aggregatorPID reads the pid file the process launcher keeps for an
// experiment's running aggregator process.
func aggregatorPID(expDir string) (int, error) {
	data, err := os.ReadFile(filepath.Join(expDir, director.ProcessPIDFile))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(data)))
}

// TestProcessLauncherAggregatorKilled (issue 19): with launcher: process
// each experiment's aggregator is a child process of the director. It is
// killed (SIGKILL) mid-round; the director starts it again, the new process
// resumes from the checkpoint on the same address, the envoys' collaborators
// carry on without a restart, and the experiment finishes with every round
// completed once: in the events, in the director's log and on disk.
func TestProcessLauncherAggregatorKilled(t *testing.T) {
	requireE2E(t)
	sites := []string{"site-1", "site-2"}
	f := newFed(t, []string{"alice"}, sites)
	f.startDirector(directorOptions{launcher: "process"})
	for i, name := range sites {
		f.startEnvoy(name, syntheticShard(i+1, 2, "features: 64\ntrain_samples: 12000\nvalid_samples: 1000\n"))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	const rounds = 12
	exp := f.submit("alice", writePlan(t, syntheticPlan("proc", rounds, "hidden: [64], lr: 0.05, batch_size: 64, epochs: 3", "deadline: 5m, min_reporting: 2")))
	expDir := filepath.Join(f.dataDir, "experiments", exp.GetId())
	var killRound int32
	var pid int
	f.waitFor(3*time.Minute, "round 2 under an aggregator process", func() (bool, error) {
		e, err := getExp(c, "proc")
		if err != nil {
			return false, err
		}
		if experiment.Ended(e.GetState()) || e.GetRound() >= rounds {
			t.Fatalf("experiment %s in round %d before the kill: make rounds slower", e.GetState(), e.GetRound())
		}
		killRound = e.GetRound()
		if pid, err = aggregatorPID(expDir); err != nil {
			return false, err
		}
		return e.GetState() == fxv1.ExperimentState_RUNNING && killRound >= 2, fmt.Errorf("%s, round %d", e.GetState(), killRound)
	})
	// The aggregator is the director's child, not the director itself.
	if pid == f.director.cmd.Process.Pid {
		t.Fatalf("the pid file names the director (%d)", pid)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 %d: %v", pid, err)
	}
	t.Logf("killed the aggregator process %d in round %d", pid, killRound)

	e := f.waitState(c, "proc", 5*time.Minute, fxv1.ExperimentState_FINISHED)
	if e.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", e.GetRound(), rounds)
	}
	dlog := f.director.log()
	if n := strings.Count(dlog, "the aggregator process died; starting it again from its checkpoint"); n != 1 {
		t.Errorf("the director restarted the aggregator process %d times, want once", n)
	}
	if n := strings.Count(dlog, "aggregator process started"); n != 2 {
		t.Errorf("the director started %d aggregator processes, want 2", n)
	}
	alog, err := os.ReadFile(filepath.Join(expDir, director.ProcessLogFile))
	if err != nil {
		t.Fatal(err)
	}
	// The second process resumed from the checkpoint of the round before
	// the one under way at the look (or a later one, had rounds completed
	// in the instant between the look and the kill) and ran the next round.
	starts := strings.Split(string(alog), "===== fx director: starting the aggregator process")
	if len(starts) != 3 {
		t.Fatalf("the aggregator's log shows %d starts, want 2:\n%s", len(starts)-1, tail(string(alog), 4000))
	}
	completedAt, resumedRound := -1, -1
	for _, line := range strings.Split(starts[2], "\n") {
		if strings.Contains(line, "resuming from checkpoint:") && completedAt < 0 {
			completedAt = atoi(logField(line, "completed_round"))
		}
		if strings.Contains(line, "round started:") && logField(line, "resumed") == "true" && resumedRound < 0 {
			resumedRound = atoi(logField(line, "round"))
		}
	}
	if completedAt < int(killRound)-1 || resumedRound != completedAt+1 {
		t.Errorf("the second aggregator process resumed after round %d with round %d; the kill was in round %d:\n%s",
			completedAt, resumedRound, killRound, tail(starts[2], 4000))
	}

	// Every round once in the events, reported by every site once.
	evs := f.watchEvents("alice", "proc")
	checkSequences(t, evs)
	aggregates(t, evs) // fails on a round's aggregate published twice
	for r := 1; r <= rounds; r++ {
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, sites) {
			t.Errorf("round %d: train reported by %v, want every site once", r, got)
		}
	}
	completed := map[int]int{}
	for _, line := range strings.Split(dlog, "\n") {
		if strings.Contains(line, "fx.director: round completed:") {
			completed[atoi(logField(line, "round"))]++
		}
	}
	for r := 1; r <= rounds+1; r++ {
		if completed[r] != 1 {
			t.Errorf("round %d completed %d times in the director's log, want once", r, completed[r])
		}
	}
	// On disk: a round file per round (and the final validation-only
	// round's) and a model per training round, no more.
	dir := filepath.Join(expDir, "aggregator")
	files, err := filepath.Glob(filepath.Join(dir, "rounds", "round-*.json"))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{aggregator.RoundPath(dir, rounds+1)}
	for r := rounds; r >= 1; r-- {
		want = append([]string{aggregator.RoundPath(dir, r)}, want...)
		if _, err := os.Stat(aggregator.ModelPath(dir, r)); err != nil {
			t.Errorf("round %d's model: %v", r, err)
		}
	}
	if !slices.Equal(files, want) {
		t.Errorf("round files %v, want rounds 1 to %d", files, rounds+1)
	}
	if discarded, _ := filepath.Glob(filepath.Join(dir, "discarded", "*")); len(discarded) > 0 {
		t.Errorf("the resume set files aside: %v", discarded)
	}
	// No aggregator process is left, and the envoys never restarted.
	if _, err := os.Stat(filepath.Join(expDir, director.ProcessPIDFile)); !os.IsNotExist(err) {
		t.Errorf("the pid file is still there after the experiment ended: %v", err)
	}
	for _, name := range sites {
		if n := strings.Count(f.envoys[name].log(), "starting the collaborator"); n != 1 {
			t.Errorf("%s started its collaborator %d times, want once", name, n)
		}
	}
}
