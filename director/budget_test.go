package director

import (
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/fx-fl/fx/internal/disk/disktest"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestSubmissionOverTheDiskBudget (issue 16 item 5): an experiment whose
// kept models would not fit on the director's disk beside its reserve is
// refused at submission, saying how to make it fit; with fewer models kept
// the same experiment is accepted. Before, any number of rounds was
// accepted, and every round's model kept until the disk was full.
func TestSubmissionOverTheDiskBudget(t *testing.T) {
	mnt := disktest.Small(t, 48<<20)
	f := newFed(t, func(c *Config) { c.DataDir = mnt; c.DiskReserve = 8 << 20 })
	model := map[string]string{InitialModelFile: noise(1 << 20)}
	plan := func(name, extra string) string {
		return "name: " + name + "\nrounds: 100\nparticipants: {min: 2, tags: [fashion]}\nrunner: {kind: builtin, model: mlp}\n" + extra
	}
	all := plan("all-models", "")
	_, err := submit(ctxT(t), f.researcher("alice"), upload{plan: all, data: archive(t, all, model)})
	if code(err) != codes.ResourceExhausted {
		t.Fatalf("101 models of 1 MiB on a 48 MiB disk: %v, want RESOURCE_EXHAUSTED", err)
	}
	for _, want := range []string{"101 models of 1048576 bytes", "retention.every", "disk_reserve_bytes"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %q", err, want)
		}
	}
	few := plan("few-models", "retention: {every: 0}\n")
	if _, err := submit(ctxT(t), f.researcher("alice"), upload{plan: few, data: archive(t, few, model)}); err != nil {
		t.Fatalf("4 models of 1 MiB on a 48 MiB disk: %v", err)
	}
}

// TestPausedExperiment (issue 16 item 6): an aggregator that pauses for a
// resource shows PAUSED with its reason, keeps its participants (an envoy
// that reconnects is sent where the aggregator is), runs again when the
// aggregator resumes, and a director restarted while it is paused runs it
// again.
func TestPausedExperiment(t *testing.T) {
	f := newFed(t, nil)
	e, agg := f.running("alice")
	const why = "round 1: write model: no space left on device; it resumes by itself once that is fixed"
	agg.spec.Sink.Paused(why)
	if got := f.waitState(e.Id, fxv1.ExperimentState_PAUSED); got.GetReason() != why {
		t.Fatalf("paused with reason %q, want %q", got.GetReason(), why)
	}
	w := f.watch("a")
	if s := w.next(t, e.Id, "start").GetStart(); s.GetAggregatorAddress() != agg.spec.Listener.Addr().String() {
		t.Fatalf("a paused experiment's envoy was sent %v", s)
	}
	agg.spec.Sink.Resumed()
	if got := f.waitState(e.Id, fxv1.ExperimentState_RUNNING); got.GetReason() != "" {
		t.Fatalf("running again with reason %q", got.GetReason())
	}
	agg.spec.Sink.Paused(why)
	f.waitState(e.Id, fxv1.ExperimentState_PAUSED)
	f.restart()
	f.launcher.agg(t, e.Id, 1)
	f.waitState(e.Id, fxv1.ExperimentState_RUNNING)
}
