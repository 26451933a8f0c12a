package e2e

import (
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// TestPersonalisedLayers: the built-in MLP with its output layer (fc1)
// local on two sites. Each site keeps its own fc1 in its work directory,
// round after round, and never uploads it: after the last round the two
// sites' heads differ from each other and from the global model's, whose
// fc1 stays at its initial values (round 1's model's), while its shared
// layer (fc0) is aggregated. The sites delete their copy of an ended
// experiment, so the test reads their heads while it runs.
func TestPersonalisedLayers(t *testing.T) {
	sites := []string{"site-1", "site-2"}
	f := newFed(t, []string{"alice"}, sites)
	f.startDirector(directorOptions{})
	for i, s := range sites {
		f.startEnvoy(s, syntheticShard(i+1, 2, ""))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	const rounds = 3
	plan := strings.Replace(syntheticPlan("personal", rounds, "", ""), "aggregation: {algorithm: fedavg}",
		"aggregation: {algorithm: fedavg, local: ['fc1.*']}", 1)
	e := f.submit("alice", writePlan(t, plan))

	// Watch each site's kept head until the experiment ends.
	type head struct {
		round int
		model tensor.Model
	}
	var mu sync.Mutex
	heads := map[string]head{}
	ctx, stop := context.WithCancel(context.Background())
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			for _, s := range sites {
				m, meta, err := tensor.ReadFile(filepath.Join(f.dir, "envoys", s, "experiments", e.GetId(), "collaborator", "local.safetensors"))
				if err != nil {
					continue // not yet, or gone
				}
				r, _ := strconv.Atoi(meta["fx.round"])
				mu.Lock()
				if r >= heads[s].round {
					heads[s] = head{r, m}
				}
				mu.Unlock()
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	f.waitState(c, "personal", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	stop()
	<-watched

	model := func(args ...string) tensor.Model {
		file := filepath.Join(t.TempDir(), "m.safetensors")
		f.mustExp("alice", append([]string{"model", "personal", "-o", file}, args...)...)
		m, _, err := tensor.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	first, last := model("--round", "1"), model("--last")
	for _, name := range []string{"fc1.weight", "fc1.bias"} {
		if !equalTensor(first.Get(name), last.Get(name)) {
			t.Errorf("the global model's %s changed: local tensors are not aggregated", name)
		}
	}
	if equalTensor(first.Get("fc0.weight"), last.Get("fc0.weight")) {
		t.Error("the global model's fc0.weight did not change: the shared layer was not aggregated")
	}
	mu.Lock()
	defer mu.Unlock()
	for _, s := range sites {
		h := heads[s]
		if h.round != rounds || len(h.model) != 2 || h.model.Get("fc1.weight") == nil || h.model.Get("fc1.bias") == nil {
			t.Fatalf("%s kept %d tensors of round %d, want fc1.weight and fc1.bias of round %d", s, len(h.model), h.round, rounds)
		}
		if equalTensor(h.model.Get("fc1.weight"), last.Get("fc1.weight")) {
			t.Errorf("%s's head is the global model's: it did not train its own", s)
		}
	}
	if equalTensor(heads["site-1"].model.Get("fc1.weight"), heads["site-2"].model.Get("fc1.weight")) {
		t.Error("the two sites ended with the same head: each should have its own")
	}
}

func equalTensor(a, b *tensor.Tensor) bool {
	return a != nil && b != nil && tensor.SameLayout(a, b) && string(a.Data) == string(b.Data)
}
