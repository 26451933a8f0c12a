package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testpg"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// startDirectorPair starts two directors on one PostgreSQL database and one
// data_dir, the first alone until it leads, then the second, which stands
// by. f.addr becomes both addresses, so envoys and clients started
// afterwards follow whichever leads.
func (f *fed) startDirectorPair(dsn string) (leader, standby *proc) {
	f.t.Helper()
	f.writeDirectorConfig(directorOptions{})
	base, err := os.ReadFile(f.dirConfig)
	if err != nil {
		f.t.Fatal(err)
	}
	first := f.addr
	second := fmt.Sprintf("127.0.0.1:%d", freePort(f.t))
	storeCfg := fmt.Sprintf("store:\n  kind: postgres\n  postgres:\n    dsn: %q\n", dsn)
	var procs []*proc
	for i, addr := range []string{first, second} {
		cfg := strings.Replace(string(base), "listen_address: "+first, "listen_address: "+addr, 1) + storeCfg
		file := filepath.Join(f.dir, fmt.Sprintf("director-%d.yaml", i+1))
		if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
			f.t.Fatal(err)
		}
		procs = append(procs, f.newProc(fmt.Sprintf("director-%d", i+1), nil, "director", "start", "--config", file))
	}
	f.director = procs[0]
	f.addr = first
	f.restartDirector() // starts director-1 and waits until it serves
	procs[1].start(f.t)
	f.waitFor(30*time.Second, "director-2 to stand by", func() (bool, error) {
		return strings.Contains(procs[1].log(), "standing by"), nil
	})
	f.addr = first + "," + second
	return procs[0], procs[1]
}

// TestDirectorFailover (issue 19): two directors share a PostgreSQL
// database and a data_dir; three envoys run an experiment with both
// addresses. The leader is killed (SIGKILL) mid-round. The standby takes
// the lead, reloads the state and resumes the experiment from its last
// completed round; the envoys, never restarted, follow it and the moved
// aggregator; the experiment finishes with every round once, in the
// events and on disk.
func TestDirectorFailover(t *testing.T) {
	requireE2E(t)
	pg := testpg.Start(t)
	sites := []string{"site-1", "site-2", "site-3"}
	f := newFed(t, []string{"alice"}, sites)
	leader, standby := f.startDirectorPair(pg.NewDatabase(t))
	for i, name := range sites {
		f.startEnvoy(name, syntheticShard(i+1, 3, "features: 64\ntrain_samples: 12000\nvalid_samples: 1000\n"))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	const rounds = 8
	plan := strings.Replace(syntheticPlan("failover", rounds, "hidden: [64], lr: 0.05, batch_size: 64, epochs: 2", "deadline: 2m, min_reporting: 3"), "min: 2", "min: 3", 1)
	exp := f.submit("alice", writePlan(t, plan))
	var killRound int32
	f.waitFor(3*time.Minute, "round 3", func() (bool, error) {
		e, err := getExp(c, "failover")
		if err != nil {
			return false, err
		}
		if experiment.Ended(e.GetState()) || e.GetRound() >= rounds {
			t.Fatalf("experiment %s in round %d before the failover: make rounds slower", e.GetState(), e.GetRound())
		}
		killRound = e.GetRound()
		return e.GetState() == fxv1.ExperimentState_RUNNING && killRound >= 3, fmt.Errorf("%s, round %d", e.GetState(), killRound)
	})
	leader.kill(t)
	t.Logf("killed the leader (director-1) in round %d", killRound)

	e := f.waitState(c, "failover", 4*time.Minute, fxv1.ExperimentState_FINISHED)
	if e.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", e.GetRound(), rounds)
	}
	log := standby.log()
	if !strings.Contains(log, "leading") || !strings.Contains(log, "taking over from a leader that did not step down") {
		t.Errorf("director-2's log does not say it took the lead from a dead leader:\n%s", tail(log, 3000))
	}
	// The leader was killed in round killRound or, rounds being short, a
	// little later: the standby resumes after the last durable round,
	// which is not before the one the leader was seen in.
	resumed := 0
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, "round started:") && logField(line, "resumed") == "true" {
			resumed = atoi(logField(line, "round"))
		}
	}
	if resumed < int(killRound) {
		t.Errorf("director-2 resumed round %d, want round %d or later", resumed, killRound)
	}

	// Every round once in the events, reported by every site once.
	evs := f.watchEvents("alice", "failover")
	checkSequences(t, evs)
	for r := 1; r <= rounds; r++ {
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, sites) {
			t.Errorf("round %d: train reported by %v, want every site once", r, got)
		}
	}
	// Each round completed once, across both directors.
	completed := map[int]int{}
	for _, p := range []*proc{leader, standby} {
		for _, line := range strings.Split(p.log(), "\n") {
			if strings.Contains(line, "fx.director: round completed:") {
				completed[atoi(logField(line, "round"))]++
			}
		}
	}
	for r := 1; r <= rounds+1; r++ {
		if completed[r] != 1 {
			t.Errorf("round %d completed %d times across the directors, want once", r, completed[r])
		}
	}
	// And on disk: a round file per round (and the final validation-only
	// round's) and a model per training round, no more.
	dir := filepath.Join(f.dataDir, "experiments", exp.GetId(), "aggregator")
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
	// The envoys were never restarted: each started its collaborator once
	// and followed the aggregator to the new leader.
	for _, name := range sites {
		p := f.envoys[name]
		if !p.running() {
			t.Errorf("%s is not running", name)
		}
		log := p.log()
		if n := strings.Count(log, "starting the collaborator"); n != 1 {
			t.Errorf("%s started its collaborator %d times, want once", name, n)
		}
		if !strings.Contains(log, "the aggregator moved; the collaborator follows it") {
			t.Errorf("%s's log does not say it followed the moved aggregator", name)
		}
	}
}
