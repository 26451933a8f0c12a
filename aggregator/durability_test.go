package aggregator_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/internal/disk/disktest"
	"github.com/fx-fl/fx/tensor"
)

// stoppedAfterTwo runs threeRounds with alpha (+1 a round) and beta (+3),
// and stops the aggregator, and then the collaborators, once round 2 is
// complete and round 3 cannot close (beta is held in it). The final bias
// after three rounds is 6.
func stoppedAfterTwo(t *testing.T) *federation {
	t.Helper()
	return stoppedAfterTwoOf(t, threeRounds)
}

func stoppedAfterTwoOf(t *testing.T, plan string) *federation {
	t.Helper()
	f := newFederation(t, parsePlan(t, plan), "alpha", "beta")
	f.grace = time.Second
	f.start()
	ctx, stop := context.WithCancel(t.Context())
	gate := make(chan struct{})
	alpha := f.collab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	beta := f.collab(ctx, "beta", &gatedRunner{stepRunner: stepRunner{Step: 3, Samples: 1}, gate: gate, gateRound: 3}, t.TempDir())
	f.sink.waitRounds(t, 2, 30*time.Second)
	if err := f.stop(); err == nil {
		t.Fatal("a cancelled aggregator returned nil")
	}
	stop()
	<-alpha
	<-beta
	return f
}

// resumeAndFinish restarts the aggregator and the collaborators, as a
// director restart and the envoys that follow it do, lets the experiment
// finish, checks the final bias is 6, and returns the first round the
// aggregator completed.
func resumeAndFinish(t *testing.T, f *federation) int {
	t.Helper()
	first := resumeOnly(t, f)
	if got := values(readModel(t, f.dir, 3), "fc.bias"); !equalFloats(got, []float32{6, 6}) {
		t.Fatalf("final bias %v, want [6 6]: a round was lost, repeated or resumed from a wrong model", got)
	}
	return first
}

func resumeOnly(t *testing.T, f *federation) int {
	t.Helper()
	f.sink = newSink()
	f.start()
	f.collab(t.Context(), "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	f.collab(t.Context(), "beta", &stepRunner{Step: 3, Samples: 1}, t.TempDir())
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("resumed Run: %v", err)
	}
	sums := f.sink.summaries()
	if len(sums) == 0 {
		t.Fatal("the resumed aggregator completed no round")
	}
	return sums[0].Round
}

// TestResumesFilesOfThePreviousVersion: an experiment checkpointed by the
// fx before digests (no checksums, no digests, the server optimiser's
// state in one optimizer.safetensors) resumes where it stopped and ends
// with the model an uninterrupted run makes.
func TestResumesFilesOfThePreviousVersion(t *testing.T) {
	plan := threeRounds + "aggregation: {algorithm: fedadam, lr: 0.5}\n"
	want := newFederation(t, parsePlan(t, plan), "alpha", "beta")
	want.start()
	want.collab(t.Context(), "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	want.collab(t.Context(), "beta", &stepRunner{Step: 3, Samples: 1}, t.TempDir())
	if err := want.wait(60 * time.Second); err != nil {
		t.Fatal(err)
	}

	f := stoppedAfterTwoOf(t, plan)
	// Undo what this version adds: seals, digests, per-round optimiser state.
	for _, path := range []string{filepath.Join(f.dir, "checkpoint.json"), aggregator.RoundPath(f.dir, 1), aggregator.RoundPath(f.dir, 2)} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatal(err)
		}
		for _, k := range []string{"checksum", "model_sha256", "initial_sha256", "optimizer_sha256", "participants", "best", "optimizer_step"} {
			if !strings.HasSuffix(path, "checkpoint.json") || (k != "best" && k != "optimizer_step") {
				delete(v, k)
			}
		}
		b, _ = json.Marshal(v)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Rename(filepath.Join(f.dir, "optimizer", "round-000002.safetensors"), filepath.Join(f.dir, "optimizer.safetensors")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(f.dir, "optimizer")); err != nil {
		t.Fatal(err)
	}
	if first := resumeOnly(t, f); first != 3 {
		t.Fatalf("resumed at round %d, want 3", first)
	}
	if got, w := values(readModel(t, f.dir, 3), "fc.bias"), values(readModel(t, want.dir, 3), "fc.bias"); !equalFloats(got, w) {
		t.Fatalf("final bias %v after resuming the old files, %v without a stop", got, w)
	}
}

// TestMissingCheckpointResumesFromRoundFiles (issue 16 item 4): with
// checkpoint.json gone, the aggregator rebuilds it from the newest intact
// round instead of starting again from round 1 (as it did: it rewrote
// round 0 and recomputed every round).
func TestMissingCheckpointResumesFromRoundFiles(t *testing.T) {
	for name, damage := range map[string]func(path string) error{
		"missing": os.Remove,
		"empty":   func(p string) error { return os.Truncate(p, 0) },
		"edited":  func(p string) error { return rewrite(p, `"completed": 2`, `"completed": 3`) },
	} {
		t.Run(name, func(t *testing.T) {
			f := stoppedAfterTwo(t)
			if err := damage(filepath.Join(f.dir, "checkpoint.json")); err != nil {
				t.Fatal(err)
			}
			if first := resumeAndFinish(t, f); first != 3 {
				t.Fatalf("resumed at round %d, want 3 (rounds 1 and 2 are intact)", first)
			}
		})
	}
}

// TestDamagedLatestRoundFallsBack (issue 16 items 6 and 7): when the
// latest round's model is damaged (truncated, its bytes changed, NaNs
// written in a well-formed file) the aggregator resumes from the newest
// intact round, sets the damaged round's files aside, and runs that round
// again. Before, a truncated model failed the experiment for good and a
// changed or NaN one was loaded without notice. Directories written
// before fx kept digests still get the finiteness check.
func TestDamagedLatestRoundFallsBack(t *testing.T) {
	nan := func(legacy bool) func(f *federation) error {
		return func(f *federation) error {
			m := readModel(t, f.dir, 2)
			m.Get("fc.weight").Float32s()[1] = float32(math.NaN())
			if err := tensor.WriteFile(aggregator.ModelPath(f.dir, 2), m, nil); err != nil {
				return err
			}
			if !legacy {
				return nil
			}
			// As the previous version wrote it: no digests, no checksum.
			return os.WriteFile(filepath.Join(f.dir, "checkpoint.json"), []byte(`{"experiment_id": "`+experimentID+`", "completed": 2}`), 0o600)
		}
	}
	for name, damage := range map[string]func(f *federation) error{
		"truncated": func(f *federation) error {
			fi, err := os.Stat(aggregator.ModelPath(f.dir, 2))
			if err != nil {
				return err
			}
			return os.Truncate(aggregator.ModelPath(f.dir, 2), fi.Size()-4)
		},
		"bytes changed": func(f *federation) error {
			path := aggregator.ModelPath(f.dir, 2)
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			b[len(b)-1] ^= 0x40 // a float's exponent: still a number
			return os.WriteFile(path, b, 0o600)
		},
		"NaN":             nan(false),
		"NaN, no digests": nan(true),
		"round summary edited": func(f *federation) error {
			return rewrite(aggregator.RoundPath(f.dir, 2), `"round": 2`, `"round": 2, "missing": ["alpha"]`)
		},
	} {
		t.Run(name, func(t *testing.T) {
			f := stoppedAfterTwo(t)
			if err := damage(f); err != nil {
				t.Fatal(err)
			}
			if name == "round summary edited" {
				// A checkpoint that names an intact model resumes from it;
				// History leaves the damaged summary out and says so.
				hist, _, err := aggregator.History(f.dir)
				if err == nil || len(hist) != 1 {
					t.Fatalf("History = %d rounds, %v; want round 1 and an error naming round 2", len(hist), err)
				}
				resumeAndFinish(t, f)
				return
			}
			if first := resumeAndFinish(t, f); first != 2 {
				t.Fatalf("resumed at round %d, want 2 (round 2's model is damaged, round 1's intact)", first)
			}
			kept, err := filepath.Glob(filepath.Join(f.dir, "discarded", "*", "models", "round-000002.safetensors"))
			if err != nil || len(kept) != 1 {
				t.Fatalf("the damaged model was not set aside under discarded/: %v %v", kept, err)
			}
		})
	}
}

// rewrite replaces old with new in the file at path, which must hold it.
func rewrite(path, old, new string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if !strings.Contains(string(b), old) {
		return fmt.Errorf("%s does not hold %q:\n%s", path, old, b)
	}
	return os.WriteFile(path, []byte(strings.Replace(string(b), old, new, 1)), 0o600)
}

// TestRetentionKeepsInitialBestLastTwoAndEveryNth (issue 16 item 5).
func TestRetentionKeepsInitialBestLastTwoAndEveryNth(t *testing.T) {
	plan := parsePlan(t, `
name: test
rounds: 7
participants: {min: 1}
runner: {kind: builtin, model: mlp}
retention: {every: 3}
`)
	f := newFederation(t, plan, "alpha")
	f.start()
	// The aggregated validation of round n scores round n-1's model:
	// accuracy peaks at round 3, so round 2's model is the best.
	acc := func(round int) float64 { return 1 - math.Abs(float64(round)-3)/10 }
	f.collab(t.Context(), "alpha", &stepRunner{Step: 1, Samples: 1, Accuracy: acc}, t.TempDir())
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	var kept []int
	for r := 0; r <= 7; r++ {
		if _, err := os.Stat(aggregator.ModelPath(f.dir, r)); err == nil {
			kept = append(kept, r)
		}
	}
	// 0: initial; 2: best; 3, 6: every 3rd; 6, 7: the last two.
	if want := []int{0, 2, 3, 6, 7}; fmt.Sprint(kept) != fmt.Sprint(want) {
		t.Fatalf("models kept %v, want %v", kept, want)
	}
	if f.sink.best == nil || f.sink.best.Round != 2 {
		t.Fatalf("best %+v, want round 2", f.sink.best)
	}
}

// TestFullDiskPausesAndResumes (issue 16 item 6): the disk under the
// aggregator fills while a round is under way. Writing the round's model
// fails with ENOSPC; the experiment pauses (the sink hears why) instead of
// failing, keeps the round's model in memory, and resumes by itself once
// space is freed, losing nothing. Before, the round failed the experiment
// for good.
func TestFullDiskPausesAndResumes(t *testing.T) {
	mnt := disktest.Small(t, 4<<20)
	f := newFederation(t, parsePlan(t, threeRounds), "alpha", "beta")
	f.dir = filepath.Join(mnt, "aggregator")
	f.pauseRetry = 50 * time.Millisecond
	f.start()
	ctx := t.Context()
	gate := make(chan struct{})
	f.collab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	f.collab(ctx, "beta", &gatedRunner{stepRunner: stepRunner{Step: 3, Samples: 1}, gate: gate, gateRound: 2}, t.TempDir())
	f.sink.waitRounds(t, 1, 30*time.Second)

	filler := disktest.Fill(t, mnt)
	close(gate) // round 2 closes on a full disk
	reason := waitPause(t, f.sink, 30*time.Second)
	if !strings.Contains(reason, "round 2: write model") || !strings.Contains(reason, "no space left on device") {
		t.Fatalf("paused with %q; want the round 2 model write and ENOSPC named", reason)
	}
	select {
	case err := <-f.done:
		t.Fatalf("the aggregator ended on a full disk: %v", err)
	default:
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("Run after the disk was freed: %v", err)
	}
	if log := f.sink.pauseLog(); len(log) != 2 || log[1] != "" {
		t.Fatalf("pause log %q, want a pause then a resume", log)
	}
	if got := values(readModel(t, f.dir, 3), "fc.bias"); !equalFloats(got, []float32{6, 6}) {
		t.Fatalf("final bias %v, want [6 6]", got)
	}
}

// TestDiskBudgetPausesBeforeARound (issue 16 item 5): a round starts only
// when the disk has room for its files and the reserve; short of that the
// experiment pauses before the round, and starts it once there is room.
func TestDiskBudgetPausesBeforeARound(t *testing.T) {
	mnt := disktest.Small(t, 8<<20)
	f := newFederation(t, parsePlan(t, threeRounds), "alpha", "beta")
	f.dir = filepath.Join(mnt, "aggregator")
	f.pauseRetry = 50 * time.Millisecond
	f.diskReserve = 2 << 20
	f.start()
	ctx := t.Context()
	gate := make(chan struct{})
	f.collab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	f.collab(ctx, "beta", &gatedRunner{stepRunner: stepRunner{Step: 3, Samples: 1}, gate: gate, gateRound: 1}, t.TempDir())
	// Leave less than the reserve free: round 1 is written (a few
	// kilobytes fit), round 2 must not start.
	filler := disktest.Fill(t, mnt)
	if err := os.Truncate(filler, mustSize(t, filler)-(1<<20)); err != nil {
		t.Fatal(err)
	}
	close(gate)
	reason := waitPause(t, f.sink, 30*time.Second)
	if !strings.Contains(reason, "before round 2") || !strings.Contains(reason, "reserve") {
		t.Fatalf("paused with %q; want the check before round 2 and the reserve named", reason)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("Run after the disk was freed: %v", err)
	}
	if got := values(readModel(t, f.dir, 3), "fc.bias"); !equalFloats(got, []float32{6, 6}) {
		t.Fatalf("final bias %v, want [6 6]", got)
	}
}

func mustSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// waitPause waits for the sink to hear of a pause and returns its reason.
func waitPause(t *testing.T, s *recordingSink, timeout time.Duration) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		if log := s.pauseLog(); len(log) > 0 {
			return log[0]
		}
		select {
		case <-s.changed:
		case <-deadline:
			t.Fatalf("no pause within %s", timeout)
		}
	}
}
