package director

import (
	"path/filepath"
	"testing"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestRealAggregator runs an experiment with the in-process launcher: the
// Start assignment's address and server name reach the real aggregator
// over mutual TLS with the envoy's certificate, the aggregator hands out
// round 1, and cancelling the experiment makes it tell the collaborator to
// quit.
func TestRealAggregator(t *testing.T) {
	f := newFed(t, func(c *Config) { c.Launcher = InProcess{} })
	ctx := ctxT(t)
	f.register("a", "fashion")
	f.register("b", "fashion")
	w := f.watch("a")
	e := f.submitPlan("alice", planTwo)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
	for _, n := range []string{"a", "b"} {
		_, err := f.answer(n, e.Id, true)
		must(t, err)
	}
	start := w.next(t, e.Id, "start").GetStart()

	k, err := pki.NewKeyring(pki.KeyringConfig{Files: pki.PartyFiles(filepath.Join(f.certDir, "envoy-a"), "a")})
	must(t, err)
	conn, err := pki.NewClient(start.GetAggregatorAddress(), k, start.GetAggregatorServerName())
	must(t, err)
	defer conn.Close()
	agg := fxv1.NewAggregatorClient(conn)
	tasks, err := agg.GetTasks(ctx, &fxv1.GetTasksRequest{ExperimentId: e.Id, Collaborator: "a"})
	must(t, err)
	if tasks.GetAction() != fxv1.GetTasksResponse_RUN || tasks.GetRound() != 1 || len(tasks.GetTasks()) != 3 {
		t.Fatalf("GetTasks = %v", tasks)
	}

	_, err = f.researcher("alice").CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: e.Id}})
	must(t, err)
	quit, err := agg.GetTasks(ctx, &fxv1.GetTasksRequest{ExperimentId: e.Id, Collaborator: "a"})
	if err == nil && quit.GetAction() != fxv1.GetTasksResponse_QUIT {
		t.Errorf("GetTasks after cancel = %v, want QUIT or the aggregator gone", quit)
	}
	// The initial model (round 0) was written and stays downloadable.
	info, _, err := download(ctx, f.researcher("alice"), &fxv1.DownloadModelRequest{Experiment: &fxv1.ExperimentRef{Id: e.Id}, Selector: fxv1.ModelSelector_ROUND})
	must(t, err)
	if info.GetRound() != 0 || info.GetSize() == 0 {
		t.Errorf("initial model info %v", info)
	}
}
