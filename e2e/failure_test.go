package e2e

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// slowShard is synthetic data big enough that one train task takes a
// second or more, so a test can act while a round is under way.
func slowShard(i, n int) shard {
	return syntheticShard(i, n, "features: 64\ntrain_samples: 60000\nvalid_samples: 2000\n")
}

// slowSites starts a director and two envoys on slow shards, site-1 and
// site-2, and waits until both are online; it returns the federation,
// alice's client, and site-2's process, which the failure tests disturb.
func slowSites(t *testing.T) (*fed, *experiment.Client, *proc) {
	t.Helper()
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	f.startEnvoy("site-1", slowShard(1, 2))
	site2 := f.startEnvoy("site-2", slowShard(2, 2))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")
	return f, c, site2
}

const slowHyper = "hidden: [128], lr: 0.05, momentum: 0.9, batch_size: 64, epochs: 8"

// TestEnvoyKilledMidRound: an envoy dies (SIGKILL) while training; the
// round closes at the straggler deadline with the other envoy's update; the
// envoy, restarted with the same configuration and work directory, rejoins
// and reports in a later round; the experiment finishes.
func TestEnvoyKilledMidRound(t *testing.T) {
	f, c, victim := slowSites(t)

	const rounds = 5
	start := time.Now()
	f.submit("alice", writePlan(t, syntheticPlan("straggler", rounds, slowHyper, "deadline: 3s, min_reporting: 1, percent: 1.0")))

	// Kill site-2 while it computes a round: it has been handed the
	// round's tasks and has reported none (a collaborator runs them all,
	// then uploads the results).
	var killRound int32
	f.waitFor(time.Minute, "site-2 computing a round", func() (bool, error) {
		e, err := getExp(c, "straggler")
		if err != nil {
			return false, err
		}
		p := participant(e, "site-2")
		if e.GetState() == fxv1.ExperimentState_RUNNING && p != nil && p.GetTask() != "" && p.GetLastRound() < e.GetRound() && e.GetRound() < rounds-2 {
			killRound = e.GetRound()
			return true, nil
		}
		if e.GetRound() >= rounds-2 {
			t.Fatalf("round %d reached before site-2 was seen computing", e.GetRound())
		}
		return false, nil
	})
	victim.kill(t)
	killed := time.Now()
	t.Logf("killed site-2 in round %d, %s after submitting", killRound, killed.Sub(start).Round(time.Millisecond))

	// The round closes without it, at the deadline.
	f.waitFor(30*time.Second, "the round site-2 died in to close", func() (bool, error) {
		e, err := getExp(c, "straggler")
		if err != nil {
			return false, err
		}
		return e.GetRound() > killRound || e.GetState() == fxv1.ExperimentState_FINISHED, nil
	})
	t.Logf("round %d closed %s after the kill", killRound, time.Since(killed).Round(time.Millisecond))
	// Without heartbeats it is shown disconnected (offline_after is 4s).
	f.waitFor(30*time.Second, "site-2 shown DISCONNECTED", func() (bool, error) {
		e, err := getExp(c, "straggler")
		if err != nil {
			return false, err
		}
		p := participant(e, "site-2")
		return p.GetState() == fxv1.ParticipantState_DISCONNECTED, fmt.Errorf("site-2: %v", p)
	})

	// Back with the same configuration and work directory.
	victim.start(t)
	e := f.waitState(c, "straggler", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("finished %s after submitting", time.Since(start).Round(time.Millisecond))
	if p := participant(e, "site-2"); p == nil || p.GetState() != fxv1.ParticipantState_COMPLETED {
		t.Errorf("site-2 ended as %v, want COMPLETED", p)
	}

	evs := f.watchEvents("alice", "straggler")
	checkSequences(t, evs)
	agg := aggregates(t, evs)
	for r := 1; r <= rounds; r++ {
		if _, ok := agg[r][runner.TaskTrain]; !ok {
			t.Errorf("round %d: no train aggregate", r)
		}
	}
	k := int(killRound)
	if got := reporters(evs, k, runner.TaskTrain); !slices.Equal(got, []string{"site-1"}) {
		t.Errorf("round %d (site-2 killed while training): train reported by %v, want only site-1", k, got)
	}
	rejoined := 0
	for r := k + 1; r <= rounds; r++ {
		if slices.Contains(reporters(evs, r, runner.TaskTrain), "site-2") {
			rejoined = r
			break
		}
	}
	if rejoined == 0 {
		t.Fatalf("site-2 never reported train after its restart (rounds %d..%d)", k+1, rounds)
	}
	t.Logf("site-2 rejoined and trained in round %d", rejoined)
}

// TestDirectorKilledMidExperiment: the director (and with it the
// aggregator) dies by SIGKILL after round 1 has completed, and is started
// again on the same data_dir. The experiment resumes from its last completed
// round and finishes; read from the start, the metric stream holds each
// round's aggregates exactly once, rounds 1..N with no gap and no repeat. A
// watch started before the crash rides it out and sees the same events.
func TestDirectorKilledMidExperiment(t *testing.T) {
	testDirectorRestart(t, true)
}

// TestDirectorStoppedMidExperiment is TestDirectorKilledMidExperiment
// with a graceful stop (SIGTERM), as an operator's restart would be.
func TestDirectorStoppedMidExperiment(t *testing.T) {
	testDirectorRestart(t, false)
}

func testDirectorRestart(t *testing.T, kill bool) {
	f, c, _ := slowSites(t)

	const rounds = 4
	start := time.Now()
	f.submit("alice", writePlan(t, syntheticPlan("resume", rounds, slowHyper, "deadline: 1m, min_reporting: 2")))
	f.waitState(c, "resume", time.Minute, fxv1.ExperimentState_RUNNING)

	// A watch that lives through the crash, as a researcher's would.
	watchCtx, stopWatch := context.WithTimeout(context.Background(), 3*time.Minute)
	defer stopWatch()
	files := f.files("researcher", "alice")
	watch := exec.CommandContext(watchCtx, fxBin, "experiment", "watch", "resume", "--output", "json",
		"--director", f.addr, "--server-name", "localhost", "--cert", files.Cert, "--key", files.Key, "--ca", files.CA)
	watch.Env = baseEnv()
	var watchOut, watchErr bytes.Buffer
	watch.Stdout, watch.Stderr = &watchOut, &watchErr
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	watchDone := make(chan error, 1)
	go func() { watchDone <- watch.Wait() }()

	var killRound int32
	f.waitFor(time.Minute, "round 1 to complete", func() (bool, error) {
		e, err := getExp(c, "resume")
		if err != nil {
			return false, err
		}
		killRound = e.GetRound()
		if e.GetState() != fxv1.ExperimentState_RUNNING {
			t.Fatalf("experiment %s before the crash", e.GetState())
		}
		if killRound >= rounds {
			t.Fatalf("round %d reached before the crash: make rounds slower", killRound)
		}
		return killRound >= 2, nil
	})
	if kill {
		f.director.kill(t)
	} else {
		f.director.stop(t)
	}
	t.Logf("stopped the director (SIGKILL %t) in round %d, %s after submitting", kill, killRound, time.Since(start).Round(time.Millisecond))

	f.restartDirector()
	e := f.waitState(c, "resume", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("finished %s after submitting", time.Since(start).Round(time.Millisecond))
	if e.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", e.GetRound(), rounds)
	}

	// The restarted aggregator's first round is the one the crash
	// interrupted (or the next, had it just completed), not round 1.
	first := 0
	for _, line := range logLinesAfter(f.director.log(), 2) {
		if strings.Contains(line, "round started:") {
			first = atoi(logField(line, "round"))
			break
		}
	}
	if first != int(killRound) && first != int(killRound)+1 {
		t.Errorf("after the restart the aggregator started at round %d; the crash was in round %d", first, killRound)
	}
	t.Logf("resumed at round %d", first)
	best := filepath.Join(t.TempDir(), "best.safetensors")
	f.mustExp("alice", "model", "resume", "--best", "-o", best)
	if _, _, err := tensor.ReadFile(best); err != nil {
		t.Errorf("the best model after the restart: %v", err)
	}

	evs := f.watchEvents("alice", "resume")
	checkSequences(t, evs)
	agg := aggregates(t, evs)
	for r := range agg {
		if r < 1 || r > rounds+1 {
			t.Errorf("aggregates for round %d of a %d-round experiment", r, rounds)
		}
	}
	for r := 1; r <= rounds; r++ {
		for _, task := range []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation} {
			if _, ok := agg[r][task]; !ok {
				t.Errorf("round %d: no %s aggregate", r, task)
			}
		}
		for _, task := range []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation} {
			if got := reporters(evs, r, task); !slices.Equal(got, []string{"site-1", "site-2"}) {
				t.Errorf("round %d %s: reported by %v, want each site once", r, task, got)
			}
		}
	}

	// The watch that lived through the crash saw the same stream.
	select {
	case err := <-watchDone:
		if err != nil {
			t.Fatalf("the watch across the crash: %v\n%s", err, watchErr.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("the watch across the crash did not end with the experiment")
	}
	lines := strings.Split(strings.TrimSpace(watchOut.String()), "\n")
	if len(lines) != len(evs) {
		t.Errorf("the watch across the crash printed %d events, a watch afterwards %d\n%s", len(lines), len(evs), watchErr.String())
	}
	for i := 0; i < min(len(lines), len(evs)); i++ {
		var ev fxv1.MetricEvent
		if err := protojson.Unmarshal([]byte(lines[i]), &ev); err != nil {
			t.Fatalf("watch line %q: %v", lines[i], err)
		}
		if !proto.Equal(&ev, evs[i]) {
			t.Errorf("event %d: across the crash %v, afterwards %v", i, &ev, evs[i])
			break
		}
	}
}

// TestCancelWhileAnEnvoyIsDown: a running experiment is cancelled with the
// CLI while one of its envoys is down (SIGKILL). The experiment ends
// CANCELLED with the reason; the envoy that is up stops its collaborator
// and deletes its copy; the one that was down learns of the end when it
// comes back and deletes its copy too. The models of completed rounds stay
// downloadable, and an ended experiment cannot be cancelled again.
func TestCancelWhileAnEnvoyIsDown(t *testing.T) {
	f, c, down := slowSites(t)

	e := f.submit("alice", writePlan(t, syntheticPlan("doomed", 20, slowHyper, "deadline: 3s, min_reporting: 1")))
	f.waitFor(time.Minute, "round 1 to complete", func() (bool, error) {
		e, err := getExp(c, "doomed")
		if err != nil {
			return false, err
		}
		return e.GetRound() >= 2, fmt.Errorf("round %d %s", e.GetRound(), e.GetState())
	})
	expDirs := map[string]string{}
	for _, site := range []string{"site-1", "site-2"} {
		expDirs[site] = filepath.Join(f.dir, "envoys", site, "experiments", e.GetId())
		if _, err := os.Stat(expDirs[site]); err != nil {
			t.Fatalf("%s holds no copy of the running experiment: %v", site, err)
		}
	}
	down.kill(t)

	out := f.mustExp("alice", "cancel", "doomed", "--reason", "wrong learning rate", "--output", "json")
	var cancelled fxv1.Experiment
	if err := protojson.Unmarshal([]byte(out), &cancelled); err != nil {
		t.Fatalf("fx experiment cancel --output json: %v\n%s", err, out)
	}
	if cancelled.GetState() != fxv1.ExperimentState_CANCELLED || !strings.Contains(cancelled.GetReason(), "wrong learning rate") {
		t.Errorf("after cancel: %s %q, want CANCELLED with the reason", cancelled.GetState(), cancelled.GetReason())
	}
	if e, err := getExp(c, "doomed"); err != nil {
		t.Fatal(err)
	} else {
		checkEndedParticipants(t, e)
	}
	if r := f.exp("alice", "cancel", "doomed"); r.err == nil || !strings.Contains(r.stderr, "FailedPrecondition") {
		t.Errorf("cancelling a cancelled experiment: %v %q, want FailedPrecondition", r.err, r.stderr)
	}
	f.waitFor(30*time.Second, "site-1 to delete its copy", func() (bool, error) {
		_, err := os.Stat(expDirs["site-1"])
		return os.IsNotExist(err), err
	})
	if _, err := os.Stat(expDirs["site-2"]); err != nil {
		t.Fatalf("site-2's copy vanished while it was down: %v", err)
	}
	down.start(t)
	f.waitFor(30*time.Second, "site-2, back, to delete its copy", func() (bool, error) {
		_, err := os.Stat(expDirs["site-2"])
		return os.IsNotExist(err), err
	})

	file := filepath.Join(t.TempDir(), "last.safetensors")
	f.mustExp("alice", "model", "doomed", "--last", "-o", file)
	if m, _, err := tensor.ReadFile(file); err != nil || m.Get("fc0.weight") == nil {
		t.Errorf("the last completed round's model: %v (%v)", m, err)
	}
	f.mustExp("alice", "remove", "doomed")
}

// TestEnvoyRestartedRejoinsCurrentRound: an envoy killed mid-round and
// started again at once (before the round's deadline) rejoins the round it
// left: the round completes with both sites' updates instead of waiting
// for its deadline.
func TestEnvoyRestartedRejoinsCurrentRound(t *testing.T) {
	f, c, victim := slowSites(t)

	const rounds = 3
	start := time.Now()
	f.submit("alice", writePlan(t, syntheticPlan("rejoin", rounds, slowHyper, "deadline: 10m, min_reporting: 1, percent: 1.0")))
	var killRound int32
	f.waitFor(time.Minute, "site-2 computing round 2", func() (bool, error) {
		e, err := getExp(c, "rejoin")
		if err != nil {
			return false, err
		}
		p := participant(e, "site-2")
		if e.GetRound() > 2 {
			t.Fatalf("round %d reached before site-2 was seen computing round 2", e.GetRound())
		}
		if e.GetRound() == 2 && p.GetTask() != "" && p.GetLastRound() < 2 {
			killRound = e.GetRound()
			return true, nil
		}
		return false, nil
	})
	victim.kill(t)
	victim.start(t)
	// A round that waited for its 10-minute deadline would blow this bound.
	f.waitState(c, "rejoin", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("killed and restarted site-2 in round %d; finished %s after submitting", killRound, time.Since(start).Round(time.Millisecond))

	evs := f.watchEvents("alice", "rejoin")
	aggregates(t, evs)
	for r := 1; r <= rounds; r++ {
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, []string{"site-1", "site-2"}) {
			t.Errorf("round %d: train reported by %v, want both sites once", r, got)
		}
	}
}

// TestDirectorKilledBetweenUploads: the director dies after one site has
// reported a round and before the other has, the round still open. After
// the restart the round is run again; its aggregates and each site's
// results appear once in the metric stream, not the early site's twice.
func TestDirectorKilledBetweenUploads(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"fast", "slow"})
	f.startDirector(directorOptions{})
	// Same shard of differently sized data sets: "slow" trains on six
	// times as many samples.
	f.startEnvoy("fast", syntheticShard(1, 2, "features: 64\ntrain_samples: 10000\nvalid_samples: 2000\n"))
	f.startEnvoy("slow", syntheticShard(1, 2, "features: 64\ntrain_samples: 60000\nvalid_samples: 2000\n"))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "fast", "slow")

	const rounds = 3
	f.submit("alice", writePlan(t, syntheticPlan("between", rounds, slowHyper, "deadline: 2m, min_reporting: 2")))
	var killRound int32
	f.waitFor(time.Minute, "fast to report a round that slow has not", func() (bool, error) {
		e, err := getExp(c, "between")
		if err != nil {
			return false, err
		}
		r := e.GetRound()
		if e.GetState() == fxv1.ExperimentState_FINISHED {
			t.Fatal("finished before the moment came")
		}
		if e.GetState() == fxv1.ExperimentState_RUNNING && r < rounds &&
			participant(e, "fast").GetLastRound() == r && participant(e, "slow").GetLastRound() < r {
			killRound = r
			return true, nil
		}
		return false, nil
	})
	f.director.kill(t)
	t.Logf("killed the director in round %d, fast reported, slow not", killRound)
	f.restartDirector()
	f.waitState(c, "between", 2*time.Minute, fxv1.ExperimentState_FINISHED)

	evs := f.watchEvents("alice", "between")
	checkSequences(t, evs)
	agg := aggregates(t, evs)
	for r := 1; r <= rounds; r++ {
		if _, ok := agg[r][runner.TaskTrain]; !ok {
			t.Errorf("round %d: no train aggregate", r)
		}
		for _, task := range []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation} {
			if got := reporters(evs, r, task); !slices.Equal(got, []string{"fast", "slow"}) {
				t.Errorf("round %d %s: reported by %v, want each site once", r, task, got)
			}
		}
	}
}

// TestQueueAcrossRestart: with room for one experiment at a time, a second
// waits QUEUED while the first runs; the director is killed with one
// RUNNING and one QUEUED and restarted; the first resumes, and the second
// runs after it.
func TestQueueAcrossRestart(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{maxConcurrent: 1})
	f.startEnvoy("site-1", slowShard(1, 2))
	f.startEnvoy("site-2", slowShard(2, 2))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	f.submit("alice", writePlan(t, syntheticPlan("first", 3, slowHyper, "")))
	f.waitState(c, "first", time.Minute, fxv1.ExperimentState_RUNNING)
	if e := f.submit("alice", writePlan(t, syntheticPlan("second", 2, slowHyper, ""))); e.GetState() != fxv1.ExperimentState_QUEUED {
		t.Errorf("the second experiment is %s while the first runs, want QUEUED", e.GetState())
	}
	f.director.kill(t)
	f.restartDirector()
	if e, err := getExp(c, "second"); err != nil || e.GetState() != fxv1.ExperimentState_QUEUED {
		t.Errorf("after the restart the second experiment is %v (%v), want QUEUED", e.GetState(), err)
	}
	first := f.waitState(c, "first", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	second := f.waitState(c, "second", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	// The second started only once the first had ended.
	var started time.Time
	for _, line := range logLinesAfter(f.director.log(), 2) {
		if strings.Contains(line, "experiment running:") && strings.Contains(line, second.GetId()) {
			started, _ = time.Parse("2006-01-02T15:04:05.000Z0700", strings.Fields(line)[0])
		}
	}
	if started.IsZero() {
		t.Errorf("no 'experiment running' line for the second experiment after the restart")
	} else if ended := first.GetUpdatedAt().AsTime(); started.Before(ended.Add(-time.Millisecond)) {
		t.Errorf("the second experiment started at %s, before the first ended at %s", started, ended)
	}
}

// TestDirectorKilledMidDownload: the director dies while an envoy
// downloads a large experiment archive. Restarted, it offers the
// experiment again; the envoy resumes the download where it stopped
// (rather than from the start), verifies it, and the experiment runs.
func TestDirectorKilledMidDownload(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1"})
	f.startDirector(directorOptions{})
	f.startEnvoy("site-1", syntheticShard(1, 1, ""))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1")

	// 128 MiB that does not compress, stored uncompressed in a zip.
	plan := strings.Replace(syntheticPlan("bulky", 1, "", ""), "min: 2", "min: 1", 1)
	archive := filepath.Join(t.TempDir(), "bulky.zip")
	writeStoredZip(t, archive, plan, 128<<20)
	e := f.submit("alice", archive)
	part := filepath.Join(f.dir, "envoys", "site-1", "experiments", e.GetId(), "archive.part")
	total := e.GetArchiveSize()

	// Kill the director as soon as part of the archive has arrived; a
	// tight poll, bounded.
	var got int64
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if fi, err := os.Stat(part); err == nil && fi.Size() > 0 {
			got = fi.Size()
			break
		}
		<-time.After(5 * time.Millisecond)
	}
	f.director.kill(t)
	caught := got > 0 && got < total
	if fi, err := os.Stat(part); err == nil {
		got = fi.Size()
	}
	t.Logf("killed the director with %d of %d bytes downloaded", got, total)

	f.restartDirector()
	f.waitState(c, "bulky", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	if !caught {
		t.Log("the download completed before the director died; resumption not exercised")
		return
	}
	resumed := false
	for _, line := range strings.Split(f.envoys["site-1"].log(), "\n") {
		if strings.Contains(line, "resuming the archive download") && atoi(logField(line, "offset")) > 0 {
			resumed = true
		}
	}
	if !resumed {
		t.Errorf("site-1 did not resume its download at the bytes it had (its log has no 'resuming the archive download' with offset > 0)")
	}
}

// writeStoredZip writes a zip holding plan.yaml and size random bytes,
// stored (not compressed).
func writeStoredZip(t *testing.T, path, plan string, size int) {
	t.Helper()
	out, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	zw := zip.NewWriter(out)
	w, err := zw.Create("plan.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(w, plan); err != nil {
		t.Fatal(err)
	}
	w, err = zw.CreateHeader(&zip.FileHeader{Name: "data.bin", Method: zip.Store})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(w, rand.Reader, int64(size)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestEnvoyFrozen: an envoy freezes (SIGSTOP) mid-round with its
// connections open, as a hung machine or a partition looks to its peers.
// The round closes at the straggler deadline without it and it is shown
// DISCONNECTED; when it thaws (SIGCONT) its stale work is refused or
// dropped, it rejoins, reports in a later round, and the experiment
// finishes with each site's results at most once per round.
func TestEnvoyFrozen(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	f.startEnvoy("site-1", slowShard(1, 2))
	frozen := f.startEnvoy("site-2", slowShard(2, 2))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	const rounds = 5
	start := time.Now()
	f.submit("alice", writePlan(t, syntheticPlan("frozen", rounds, slowHyper, "deadline: 3s, min_reporting: 1, percent: 1.0")))
	var freezeRound int32
	f.waitFor(time.Minute, "site-2 computing a round", func() (bool, error) {
		e, err := getExp(c, "frozen")
		if err != nil {
			return false, err
		}
		p := participant(e, "site-2")
		if e.GetRound() >= rounds-2 {
			t.Fatalf("round %d reached before site-2 was seen computing", e.GetRound())
		}
		if e.GetState() == fxv1.ExperimentState_RUNNING && p.GetTask() != "" && p.GetLastRound() < e.GetRound() {
			freezeRound = e.GetRound()
			return true, nil
		}
		return false, nil
	})
	frozen.pause(t)
	t.Logf("froze site-2 in round %d", freezeRound)
	f.waitFor(30*time.Second, "site-2 shown DISCONNECTED, its round closed", func() (bool, error) {
		e, err := getExp(c, "frozen")
		if err != nil {
			return false, err
		}
		p := participant(e, "site-2")
		return e.GetRound() > freezeRound && p.GetState() == fxv1.ParticipantState_DISCONNECTED, fmt.Errorf("round %d, site-2 %v", e.GetRound(), p)
	})
	frozen.resume(t)
	e := f.waitState(c, "frozen", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("finished %s after submitting", time.Since(start).Round(time.Millisecond))
	if p := participant(e, "site-2"); p.GetState() != fxv1.ParticipantState_COMPLETED {
		t.Errorf("site-2 ended %v, want COMPLETED", p)
	}

	evs := f.watchEvents("alice", "frozen")
	agg := aggregates(t, evs)
	rejoined := 0
	for r := 1; r <= rounds; r++ {
		if _, ok := agg[r][runner.TaskTrain]; !ok {
			t.Errorf("round %d: no train aggregate", r)
		}
		for _, task := range []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation} {
			got := reporters(evs, r, task)
			if len(slices.Compact(slices.Clone(got))) != len(got) {
				t.Errorf("round %d %s: reported by %v: a site twice", r, task, got)
			}
		}
		if r > int(freezeRound) && rejoined == 0 && slices.Contains(reporters(evs, r, runner.TaskTrain), "site-2") {
			rejoined = r
		}
	}
	if got := reporters(evs, int(freezeRound), runner.TaskTrain); slices.Contains(got, "site-2") {
		t.Errorf("round %d (site-2 frozen): train reported by %v", freezeRound, got)
	}
	if rejoined == 0 {
		t.Errorf("site-2 never trained again after it thawed")
	}
	t.Logf("site-2 trained again in round %d", rejoined)
}

// TestDirectorFrozen: the director (with its aggregator) freezes (SIGSTOP)
// mid-round until both envoys notice they lost it, then thaws. The
// envoys find it again, and the experiment finishes with each round's
// aggregates once.
func TestDirectorFrozen(t *testing.T) {
	f, c, _ := slowSites(t)

	const rounds = 4
	f.submit("alice", writePlan(t, syntheticPlan("thaw", rounds, slowHyper, "deadline: 1m, min_reporting: 2")))
	f.waitFor(time.Minute, "round 2", func() (bool, error) {
		e, err := getExp(c, "thaw")
		if err != nil {
			return false, err
		}
		return e.GetRound() >= 2, nil
	})
	marks := map[string]int{}
	for _, s := range []string{"site-1", "site-2"} {
		marks[s] = len(f.envoys[s].log())
	}
	f.director.pause(t)
	f.waitFor(time.Minute, "both envoys to notice the director is gone", func() (bool, error) {
		for s, at := range marks {
			if !strings.Contains(f.envoys[s].log()[at:], "disconnected from the director") {
				return false, fmt.Errorf("%s has not noticed", s)
			}
		}
		return true, nil
	})
	f.director.resume(t)
	f.waitState(c, "thaw", 2*time.Minute, fxv1.ExperimentState_FINISHED)

	evs := f.watchEvents("alice", "thaw")
	checkSequences(t, evs)
	agg := aggregates(t, evs)
	for r := 1; r <= rounds; r++ {
		for _, task := range []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation} {
			if _, ok := agg[r][task]; !ok {
				t.Errorf("round %d: no %s aggregate", r, task)
			}
			if got := reporters(evs, r, task); !slices.Equal(got, []string{"site-1", "site-2"}) {
				t.Errorf("round %d %s: reported by %v, want each site once", r, task, got)
			}
		}
	}
}
