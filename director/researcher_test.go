package director

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"testing"

	"google.golang.org/grpc/codes"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// collect reads a WatchMetrics stream until it ends or n events arrived.
func collect(t *testing.T, stream fxv1.Director_WatchMetricsClient, n int) ([]*fxv1.MetricEvent, error) {
	t.Helper()
	var out []*fxv1.MetricEvent
	for n < 0 || len(out) < n {
		ev, err := stream.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, ev)
	}
	return out, nil
}

func TestWatchMetrics(t *testing.T) {
	f := newFed(t, nil)
	e, agg := f.running("alice")
	c := f.researcher("alice")
	ctx := ctxT(t)
	ref := &fxv1.ExperimentRef{Id: e.Id}

	// A watcher from the start waits for events as they happen.
	live, err := c.WatchMetrics(ctx, &fxv1.WatchMetricsRequest{Experiment: ref})
	must(t, err)
	agg.completeRound(t)
	// Per round: 3 tasks × 2 results + 3 aggregates.
	first, err := collect(t, live, 9)
	must(t, err)
	for i, ev := range first {
		if ev.GetSequence() != int64(i+1) || ev.GetRound() != 1 {
			t.Fatalf("event %d: seq %d round %d", i, ev.GetSequence(), ev.GetRound())
		}
	}
	if agg := first[6]; agg.GetCollaborator() != "" || agg.GetTask() != "aggregated_model_validation" || agg.GetSamples() != 300 || agg.GetMetrics()["accuracy"] != 0.1 {
		t.Errorf("first aggregate %v", agg)
	}
	if ev := first[0]; ev.GetCollaborator() != "a" || ev.GetSamples() != 100 {
		t.Errorf("first result %v", ev)
	}

	// Several watchers; one resumes after a sequence number.
	resumed, err := c.WatchMetrics(ctx, &fxv1.WatchMetricsRequest{Experiment: ref, AfterSequence: 7})
	must(t, err)
	got, err := collect(t, resumed, 2)
	must(t, err)
	if got[0].GetSequence() != 8 || got[1].GetSequence() != 9 {
		t.Errorf("resumed at %d, %d", got[0].GetSequence(), got[1].GetSequence())
	}
	agg.completeRound(t)
	agg.result <- nil
	f.waitState(e.Id, fxv1.ExperimentState_FINISHED)
	rest, err := collect(t, live, -1) // ends with the experiment
	must(t, err)
	if len(rest) != 9 || rest[8].GetSequence() != 18 {
		t.Errorf("second round: %d events, last %v", len(rest), rest[len(rest)-1])
	}
	rest, err = collect(t, resumed, -1)
	must(t, err)
	if len(rest) != 9 {
		t.Errorf("resumed watcher got %d events of round 2", len(rest))
	}
	all, err := c.WatchMetrics(ctx, &fxv1.WatchMetricsRequest{Experiment: ref})
	must(t, err)
	everything, err := collect(t, all, -1)
	must(t, err)
	if len(everything) != 18 {
		t.Errorf("a watcher of an ended experiment got %d events, want 18", len(everything))
	}
	neg, err := c.WatchMetrics(ctx, &fxv1.WatchMetricsRequest{Experiment: ref, AfterSequence: -1})
	must(t, err)
	if _, err := neg.Recv(); code(err) != codes.InvalidArgument {
		t.Errorf("negative after_sequence: %v", err)
	}
}

func download(ctx context.Context, c fxv1.DirectorClient, req *fxv1.DownloadModelRequest) (*fxv1.ModelInfo, []byte, error) {
	stream, err := c.DownloadModel(ctx, req)
	if err != nil {
		return nil, nil, err
	}
	var info *fxv1.ModelInfo
	var buf bytes.Buffer
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return info, buf.Bytes(), nil
		}
		if err != nil {
			return nil, nil, err
		}
		if i := m.GetInfo(); i != nil {
			info = i
		}
		buf.Write(m.GetChunk())
	}
}

func TestDownloadModel(t *testing.T) {
	f := newFed(t, nil)
	e, agg := f.running("alice")
	c := f.researcher("alice")
	ctx := ctxT(t)
	ref := &fxv1.ExperimentRef{Name: "fashion"}
	if _, _, err := download(ctx, c, &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_LAST}); code(err) != codes.NotFound {
		t.Errorf("LAST before any round: %v", err)
	}
	if _, _, err := download(ctx, c, &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_BEST}); code(err) != codes.NotFound {
		t.Errorf("BEST before any round: %v", err)
	}
	agg.completeRound(t)
	agg.completeRound(t)
	tests := []struct {
		name  string
		req   *fxv1.DownloadModelRequest
		round int32
		code  codes.Code
	}{
		{"best", &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_BEST}, 2, codes.OK},
		{"last", &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_LAST}, 2, codes.OK},
		{"initial", &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_ROUND, Round: 0}, 0, codes.OK},
		{"round 1", &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_ROUND, Round: 1}, 1, codes.OK},
		{"round 9", &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_ROUND, Round: 9}, 0, codes.NotFound},
		{"negative", &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_ROUND, Round: -1}, 0, codes.InvalidArgument},
		{"no selector", &fxv1.DownloadModelRequest{Experiment: ref}, 0, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			info, data, err := download(ctx, c, tt.req)
			if code(err) != tt.code {
				t.Fatalf("DownloadModel = %v, want %v", err, tt.code)
			}
			if err != nil {
				return
			}
			want, err := os.ReadFile(modelFile(f, e.Id, int(tt.round)))
			must(t, err)
			sum := sha256.Sum256(want)
			if info.GetRound() != tt.round || info.GetSize() != int64(len(want)) || info.GetSha256() != hex.EncodeToString(sum[:]) || !bytes.Equal(data, want) {
				t.Errorf("info %v, data %q", info, data)
			}
			if tt.round > 0 && info.GetMetrics()["train/accuracy"] != float64(tt.round)/10 {
				t.Errorf("metrics %v", info.GetMetrics())
			}
			// A model's validation is the next round's
			// aggregated_model_validation, which scored it; round 2 is the
			// last completed, so its model has not been validated yet.
			validation, ok := info.GetMetrics()["aggregated_model_validation/accuracy"]
			if want := float64(tt.round+1) / 10; tt.round < 2 && (!ok || validation != want) || tt.round == 2 && ok {
				t.Errorf("round %d model's validation %v (present %v), want round %d's", tt.round, validation, ok, tt.round+1)
			}
		})
	}
}

func modelFile(f *fed, id string, round int) string {
	return f.d.aggregatorDir(id) + "/models/" + []string{"round-000000", "round-000001", "round-000002"}[round] + ".safetensors"
}

// TestOwnership: a researcher sees only its own experiments; another
// owner's are NOT_FOUND whichever way they are named; an admin sees all.
func TestOwnership(t *testing.T) {
	f := newFed(t, func(c *Config) { c.ReviewPolicy = ReviewManual })
	ctx := ctxT(t)
	e := f.submitPlan("alice", planTwo)
	f.submitPlan("bob", planTwo) // same name, another owner: allowed
	bob := f.researcher("bob")
	refs := map[string]*fxv1.ExperimentRef{
		"by id":             {Id: e.Id},
		"by name and owner": {Name: "fashion", Owner: "alice"},
	}
	for name, ref := range refs {
		t.Run(name, func(t *testing.T) {
			calls := map[string]func() error{
				"Get": func() error {
					_, err := bob.GetExperiment(ctx, &fxv1.GetExperimentRequest{Experiment: ref})
					return err
				},
				"Cancel": func() error {
					_, err := bob.CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: ref})
					return err
				},
				"Remove": func() error {
					_, err := bob.RemoveExperiment(ctx, &fxv1.RemoveExperimentRequest{Experiment: ref})
					return err
				},
				"WatchMetrics": func() error {
					s, err := bob.WatchMetrics(ctx, &fxv1.WatchMetricsRequest{Experiment: ref})
					if err != nil {
						return err
					}
					_, err = s.Recv()
					return err
				},
				"DownloadModel": func() error {
					_, _, err := download(ctx, bob, &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_LAST})
					return err
				},
			}
			for call, fn := range calls {
				if err := fn(); code(err) != codes.NotFound {
					t.Errorf("%s of alice's experiment by bob: %v, want NotFound", call, err)
				}
			}
		})
	}
	// bob's own "fashion" is found by name.
	mine, err := bob.GetExperiment(ctx, &fxv1.GetExperimentRequest{Experiment: &fxv1.ExperimentRef{Name: "fashion"}})
	must(t, err)
	if mine.GetOwner() != "bob" {
		t.Errorf("bob's fashion belongs to %s", mine.GetOwner())
	}
	if _, err := bob.GetExperiment(ctx, &fxv1.GetExperimentRequest{Experiment: &fxv1.ExperimentRef{}}); code(err) != codes.InvalidArgument {
		t.Errorf("empty ref: %v", err)
	}
	list := func(c fxv1.DirectorClient, req *fxv1.ListExperimentsRequest) []string {
		resp, err := c.ListExperiments(ctx, req)
		must(t, err)
		var owners []string
		for _, x := range resp.GetExperiments() {
			owners = append(owners, x.GetOwner())
		}
		return owners
	}
	if got := list(bob, &fxv1.ListExperimentsRequest{Owner: "alice"}); len(got) != 1 || got[0] != "bob" {
		t.Errorf("bob lists %v", got)
	}
	if got := list(f.admin(), &fxv1.ListExperimentsRequest{}); len(got) != 2 || got[0] != "bob" {
		t.Errorf("admin lists %v (newest first)", got)
	}
	if got := list(f.admin(), &fxv1.ListExperimentsRequest{Owner: "alice"}); len(got) != 1 || got[0] != "alice" {
		t.Errorf("admin lists alice's: %v", got)
	}
	if got := list(f.admin(), &fxv1.ListExperimentsRequest{States: []fxv1.ExperimentState{fxv1.ExperimentState_RUNNING}}); len(got) != 0 {
		t.Errorf("admin lists running: %v", got)
	}
	// The admin acts on alice's experiment.
	if _, err := f.admin().CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: e.Id}, Reason: "maintenance"}); err != nil {
		t.Errorf("admin cancel: %v", err)
	}
}

func TestRemove(t *testing.T) {
	f := newFed(t, nil)
	ctx := ctxT(t)
	e, agg := f.running("alice")
	agg.completeRound(t)
	c := f.researcher("alice")
	ref := &fxv1.ExperimentRef{Id: e.Id}
	if _, err := c.RemoveExperiment(ctx, &fxv1.RemoveExperimentRequest{Experiment: ref}); code(err) != codes.FailedPrecondition {
		t.Fatalf("remove while running: %v", err)
	}
	_, err := c.CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: ref})
	must(t, err)
	// Models of completed rounds stay downloadable after a cancel.
	if _, _, err := download(ctx, c, &fxv1.DownloadModelRequest{Experiment: ref, Selector: fxv1.ModelSelector_LAST}); err != nil {
		t.Errorf("download after cancel: %v", err)
	}
	_, err = c.RemoveExperiment(ctx, &fxv1.RemoveExperimentRequest{Experiment: ref})
	must(t, err)
	if _, err := c.GetExperiment(ctx, &fxv1.GetExperimentRequest{Experiment: ref}); code(err) != codes.NotFound {
		t.Errorf("get after remove: %v", err)
	}
	if _, err := os.Stat(f.d.experimentDir(e.Id)); !os.IsNotExist(err) {
		t.Errorf("experiment directory after remove: %v", err)
	}
	// The name is free again.
	f.submitPlan("alice", planTwo)
}
