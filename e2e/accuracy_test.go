package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// fashionMNIST is where Debian's dataset-fashion-mnist package puts the data.
const fashionMNIST = "/usr/share/datasets/fashion-mnist"

func requireFashionMNIST(t *testing.T) {
	t.Helper()
	for _, name := range []string{"train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"} {
		if _, err := os.Stat(filepath.Join(fashionMNIST, name)); err == nil {
			return
		}
	}
	t.Skipf("Fashion-MNIST is not installed in %s (apt-get install dataset-fashion-mnist)", fashionMNIST)
}

func fashionShard(i, n int, extra string) shard {
	return shard{tags: []string{"fashion-mnist"}, yaml: fmt.Sprintf("kind: idx\npath: %s\nshard: %d/%d\nseed: 1\n%s", fashionMNIST, i, n, extra)}
}

// TestFederatedAccuracy (issue #7): the built-in MLP trained by FedAvg over
// four envoys whose Fashion-MNIST shards are label-skewed (Dirichlet α 0.5)
// reaches 0.85 aggregated validation accuracy within 10 rounds. The
// experiment is cancelled as soon as it does.
func TestFederatedAccuracy(t *testing.T) {
	requireE2E(t)
	requireFashionMNIST(t)
	const (
		envoys = 4
		rounds = 10
		target = 0.85
	)
	names := make([]string, envoys)
	for i := range names {
		names[i] = fmt.Sprintf("site-%d", i+1)
	}
	f := newFed(t, []string{"alice"}, names)
	f.startDirector(directorOptions{})
	for i, n := range names {
		f.startEnvoy(n, fashionShard(i+1, envoys, "dirichlet_alpha: 0.5\n"))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, names...)

	plan := fmt.Sprintf(`name: fashion-skewed
rounds: %d
participants: {min: %d, tags: [fashion-mnist]}
runner:
  kind: builtin
  model: mlp
  hyperparameters: {%s}
aggregation: {algorithm: fedavg}
stragglers: {deadline: 5m, min_reporting: %d}
best_model: {metric: accuracy, mode: max}
`, rounds, envoys, hyperOverride(), envoys)
	start := time.Now()
	f.submit("alice", writePlan(t, plan))

	// Follow the aggregated validation of each round's global model: the
	// one published with round r validates the model of round r-1.
	var mu sync.Mutex
	var history []string
	reached := make(chan int, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := c.Follow(ctx, "fashion-skewed", 0, func(ev *fxv1.MetricEvent) {
			if ev.GetCollaborator() != "" || ev.GetTask() != runner.TaskAggregatedValidation || ev.GetRound() < 2 {
				return
			}
			model, acc := int(ev.GetRound())-1, ev.GetMetrics()["accuracy"]
			mu.Lock()
			history = append(history, fmt.Sprintf("round %d: %.4f (%s)", model, acc, time.Since(start).Round(100*time.Millisecond)))
			mu.Unlock()
			if acc >= target {
				select {
				case reached <- model:
				default:
				}
			}
		})
		done <- err
	}()
	var model int
	select {
	case model = <-reached:
	case err := <-done:
		// The experiment ended (or the watch failed) without reaching it.
		select {
		case model = <-reached:
		default:
			mu.Lock()
			defer mu.Unlock()
			t.Fatalf("no round reached %.2f aggregated validation accuracy (watch: %v):\n%s", target, err, strings.Join(history, "\n"))
		}
	case <-ctx.Done():
		t.Fatal("the experiment did not reach the target within 8 minutes")
	}
	took := time.Since(start)
	mu.Lock()
	t.Logf("aggregated validation accuracy per round:\n%s", strings.Join(history, "\n"))
	mu.Unlock()
	t.Logf("issue #7: %d envoys, Dirichlet α 0.5: accuracy ≥ %.2f after round %d of %d, %s after submitting", envoys, target, model, rounds, took.Round(100*time.Millisecond))
	if model > rounds {
		t.Errorf("reached %.2f only with the model of round %d, after the plan's %d rounds", target, model, rounds)
	}
	// Done: stop the experiment rather than run the remaining rounds.
	if e, err := getExp(c, "fashion-skewed"); err == nil && e.GetState() == fxv1.ExperimentState_RUNNING {
		f.mustExp("alice", "cancel", "fashion-skewed", "--reason", "target accuracy reached")
		f.waitState(c, "fashion-skewed", time.Minute, fxv1.ExperimentState_CANCELLED, fxv1.ExperimentState_FINISHED)
	}
}

// fashionHyper is the MLP's hyper-parameters, E2E_FASHION_HYPER when set
// (the body of a YAML flow mapping), to try others. Two local epochs per
// round, the starting point of runner/builtin's in-process simulation, got
// to 0.85 only in round 9 or 10 here (the fold order of the updates follows
// their arrival, so runs differ from round 3 on); three get there in rounds
// 4 to 6.
func hyperOverride() string {
	if h := os.Getenv("E2E_FASHION_HYPER"); h != "" {
		return h
	}
	return "hidden: [256], lr: 0.05, momentum: 0.9, batch_size: 64, epochs: 3"
}
