package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// syntheticPlan trains the built-in MLP on the generated data set.
func syntheticPlan(name string, rounds int, hyper, stragglers string) string {
	if hyper == "" {
		hyper = "hidden: [32], lr: 0.05, momentum: 0.9, batch_size: 64, epochs: 1"
	}
	if stragglers == "" {
		stragglers = "deadline: 2m, min_reporting: 1"
	}
	return fmt.Sprintf(`name: %s
rounds: %d
participants: {min: 2, tags: [synthetic]}
runner:
  kind: builtin
  model: mlp
  hyperparameters: {%s}
aggregation: {algorithm: fedavg}
stragglers: {%s}
best_model: {metric: accuracy, mode: max}
`, name, rounds, hyper, stragglers)
}

// TestFullExperiment: a director and two envoys run a three-round
// experiment submitted with the CLI; the best model downloads as a
// safetensors file with the MLP's tensors, and the metric stream holds every
// round's aggregates.
func TestFullExperiment(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	f.startEnvoy("site-1", syntheticShard(1, 2, ""))
	f.startEnvoy("site-2", syntheticShard(2, 2, ""))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	const rounds = 3
	start := time.Now()
	e := f.submit("alice", writePlan(t, syntheticPlan("full", rounds, "", "")))
	if e.GetName() != "full" || e.GetOwner() != "alice" || e.GetId() == "" {
		t.Fatalf("submitted: name %q owner %q id %q", e.GetName(), e.GetOwner(), e.GetId())
	}
	final := f.waitState(c, "full", 2*time.Minute, fxv1.ExperimentState_FINISHED)
	t.Logf("%d rounds with 2 envoys in %s", rounds, time.Since(start).Round(time.Millisecond))
	if final.GetRound() != rounds {
		t.Errorf("finished at round %d, want %d", final.GetRound(), rounds)
	}
	for _, site := range []string{"site-1", "site-2"} {
		p := participant(final, site)
		// The last round a participant reports in is the final
		// validation of the last model, numbered rounds+1.
		if p == nil || p.GetState() != fxv1.ParticipantState_COMPLETED || p.GetLastRound() < rounds {
			t.Errorf("participant %s: %v, want COMPLETED with last round ≥ %d", site, p, rounds)
		}
	}
	// The sites delete their copy of an experiment that has ended.
	for _, site := range []string{"site-1", "site-2"} {
		dir := filepath.Join(f.dir, "envoys", site, "experiments", e.GetId())
		f.waitFor(30*time.Second, site+" to delete its copy", func() (bool, error) {
			_, err := os.Stat(dir)
			return errors.Is(err, fs.ErrNotExist), err
		})
	}
	best := final.GetBest()
	if best == nil || best.GetMetric() != "accuracy" || best.GetRound() < 1 || best.GetRound() > rounds {
		t.Fatalf("best model summary %v", best)
	}

	// The CLI's status agrees with the client.
	st, err := f.status("alice", "full")
	if err != nil {
		t.Fatal(err)
	}
	if st.GetState() != fxv1.ExperimentState_FINISHED || st.GetId() != e.GetId() {
		t.Errorf("fx experiment status: %s %s, want FINISHED %s", st.GetState(), st.GetId(), e.GetId())
	}

	// The best model, through the CLI.
	file := filepath.Join(t.TempDir(), "best.safetensors")
	out := f.mustExp("alice", "model", "full", "--best", "-o", file, "--output", "json")
	var written struct {
		File  string          `json:"file"`
		Model json.RawMessage `json:"model"`
	}
	var info fxv1.ModelInfo
	if err := json.Unmarshal([]byte(out), &written); err != nil {
		t.Fatalf("fx experiment model --output json: %v\n%s", err, out)
	}
	if err := protojson.Unmarshal(written.Model, &info); err != nil {
		t.Fatalf("fx experiment model --output json: model: %v\n%s", err, out)
	}
	if written.File != file {
		t.Errorf("fx experiment model --output json names %q, want %q", written.File, file)
	}
	if info.GetRound() != best.GetRound() {
		t.Errorf("downloaded the model of round %d, the best is round %d", info.GetRound(), best.GetRound())
	}
	m, _, err := tensor.ReadFile(file)
	if err != nil {
		t.Fatalf("reading the best model: %v", err)
	}
	// The synthetic data: 16 features, 4 classes; hidden [32].
	want := map[string][]int64{
		"fc0.weight": {32, 16}, "fc0.bias": {32},
		"fc1.weight": {4, 32}, "fc1.bias": {4},
	}
	if len(m) != len(want) {
		t.Errorf("model has %d tensors, want %d", len(m), len(want))
	}
	for name, shape := range want {
		tn := m.Get(name)
		if tn == nil {
			t.Errorf("model has no %s", name)
			continue
		}
		if !slices.Equal(tn.Shape, shape) || tn.DType != tensor.F32 {
			t.Errorf("%s: %s %v, want F32 %v", name, tn.DType, tn.Shape, shape)
		}
	}

	// The initial model is round 0; there is no round past the last.
	initial := filepath.Join(t.TempDir(), "round0.safetensors")
	f.mustExp("alice", "model", "full", "--round", "0", "-o", initial)
	if m0, _, err := tensor.ReadFile(initial); err != nil || m0.Matches(m) != nil {
		t.Errorf("the initial model: %v, layout %v", err, m0.Matches(m))
	}
	if r := f.exp("alice", "model", "full", "--round", fmt.Sprint(rounds+1), "-o", filepath.Join(t.TempDir(), "x.safetensors")); r.err == nil || !strings.Contains(r.stderr, "NotFound") {
		t.Errorf("the model of round %d of %d: %v %q, want NotFound", rounds+1, rounds, r.err, r.stderr)
	}

	// Every round's aggregates, once each, through the CLI's watch.
	evs := f.watchEvents("alice", "full")
	checkSequences(t, evs)
	// A watch resumed after an event sees exactly the ones after it.
	half := len(evs) / 2
	rest := f.watchEvents("alice", "full", "--after", fmt.Sprint(evs[half].GetSequence()))
	if len(rest) != len(evs)-half-1 || (len(rest) > 0 && !proto.Equal(rest[0], evs[half+1])) {
		t.Errorf("watch --after %d: %d events, want the last %d", evs[half].GetSequence(), len(rest), len(evs)-half-1)
	}
	agg := aggregates(t, evs)
	for r := 1; r <= rounds; r++ {
		for _, task := range []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation} {
			m, ok := agg[r][task]
			if !ok {
				t.Errorf("round %d: no aggregate for %s", r, task)
				continue
			}
			if _, ok := m["accuracy"]; !ok {
				t.Errorf("round %d %s: no accuracy in %v", r, task, m)
			}
		}
		if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, []string{"site-1", "site-2"}) {
			t.Errorf("round %d: train reported by %v, want both sites", r, got)
		}
	}
	t.Logf("best model: round %d accuracy %.4f; aggregated validation per round: %v", best.GetRound(), best.GetValue(), accuracies(agg, runner.TaskAggregatedValidation))
	last := agg[rounds][runner.TaskLocalValidation]["accuracy"]
	if last < 0.5 {
		t.Errorf("round %d local validation accuracy %.3f: the synthetic data should be easy", rounds, last)
	}

	// The sites, as `fx envoys list` shows them to a researcher.
	files := f.files("researcher", "alice")
	out = f.fx("envoys", "list", "--output", "json", "--tags", "synthetic", "--director", f.addr, "--server-name", "localhost",
		"--cert", files.Cert, "--key", files.Key, "--ca", files.CA)
	var envoys fxv1.ListEnvoysResponse
	if err := protojson.Unmarshal([]byte(out), &envoys); err != nil {
		t.Fatalf("fx envoys list --output json: %v\n%s", err, out)
	}
	var online []string
	for _, e := range envoys.GetEnvoys() {
		if e.GetOnline() {
			online = append(online, e.GetName())
		}
	}
	slices.Sort(online)
	if !slices.Equal(online, []string{"site-1", "site-2"}) {
		t.Errorf("fx envoys list: online %v, want both sites", online)
	}

	// A name is taken until the experiment is removed.
	dir := writePlan(t, syntheticPlan("full", 1, "", ""))
	if r := f.exp("alice", "submit", dir); r.err == nil || !strings.Contains(r.stderr, "AlreadyExists") {
		t.Errorf("a second experiment named full: %v %q, want AlreadyExists", r.err, r.stderr)
	}
	// submit --wait follows an experiment to its end and prints it.
	out = f.mustExp("alice", "submit", dir, "--name", "full-again", "--wait", "--output", "json")
	var again fxv1.Experiment
	if err := protojson.Unmarshal([]byte(out), &again); err != nil {
		t.Fatalf("fx experiment submit --wait --output json: %v\n%s", err, out)
	}
	if again.GetName() != "full-again" || again.GetState() != fxv1.ExperimentState_FINISHED {
		t.Errorf("submit --wait printed %s %s, want full-again FINISHED", again.GetName(), again.GetState())
	}

	// Removing an experiment deletes its files and frees its name.
	expDir := filepath.Join(f.dataDir, "experiments", e.GetId())
	if _, err := os.Stat(expDir); err != nil {
		t.Fatalf("the director keeps no %s: %v", expDir, err)
	}
	f.mustExp("alice", "remove", "full")
	if _, err := os.Stat(expDir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("after fx experiment remove, %s: %v, want it gone", expDir, err)
	}
	if r := f.exp("alice", "model", "full", "-o", filepath.Join(t.TempDir(), "x.safetensors")); r.err == nil || !strings.Contains(r.stderr, "NotFound") {
		t.Errorf("the model of a removed experiment: %v %q, want NotFound", r.err, r.stderr)
	}
	f.submit("alice", dir)
	f.waitState(c, "full", time.Minute, fxv1.ExperimentState_FINISHED)
}

// accuracies lists each round's aggregated accuracy of task, in round order.
func accuracies(agg map[int]map[string]map[string]float64, task string) []string {
	var out []string
	for r := 1; agg[r] != nil; r++ {
		if m, ok := agg[r][task]; ok {
			out = append(out, fmt.Sprintf("%d:%.4f", r, m["accuracy"]))
		}
	}
	return out
}

// TestLargeModel: a model of several MiB, with tensors larger than the
// protocol's 1 MiB chunks, goes through every stream (the collaborators'
// downloads and uploads, the researcher's download) intact.
func TestLargeModel(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	data := "features: 512\ntrain_samples: 1000\nvalid_samples: 400\n"
	f.startEnvoy("site-1", syntheticShard(1, 2, data))
	f.startEnvoy("site-2", syntheticShard(2, 2, data))
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	f.submit("alice", writePlan(t, syntheticPlan("large", 2, "hidden: [1024, 512], lr: 0.01, momentum: 0.9, batch_size: 50, epochs: 1", "")))
	f.waitState(c, "large", 3*time.Minute, fxv1.ExperimentState_FINISHED)

	file := filepath.Join(t.TempDir(), "large.safetensors")
	out := f.mustExp("alice", "model", "large", "--last", "-o", file, "--output", "json")
	var written struct {
		Model json.RawMessage `json:"model"`
	}
	var info fxv1.ModelInfo
	if err := json.Unmarshal([]byte(out), &written); err != nil {
		t.Fatal(err)
	}
	if err := protojson.Unmarshal(written.Model, &info); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	if int64(len(b)) != info.GetSize() || hex.EncodeToString(sum[:]) != info.GetSha256() {
		t.Errorf("downloaded %d bytes sha256 %x; the director announced %d bytes sha256 %s", len(b), sum, info.GetSize(), info.GetSha256())
	}
	m, _, err := tensor.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]int64{"fc0.weight": {1024, 512}, "fc0.bias": {1024}, "fc1.weight": {512, 1024}, "fc1.bias": {512}, "fc2.weight": {4, 512}, "fc2.bias": {4}}
	for name, shape := range want {
		if tn := m.Get(name); tn == nil || !slices.Equal(tn.Shape, shape) {
			t.Errorf("%s: %v, want shape %v", name, tn, shape)
		}
	}
	if err := m.Validate(); err != nil {
		t.Errorf("the downloaded model: %v", err)
	}
	t.Logf("model of %.1f MiB, largest tensor %.1f MiB", float64(len(b))/(1<<20), float64(len(m.Get("fc0.weight").Data))/(1<<20))
}

// TestAggregationAlgorithms: every aggregation algorithm a plan may name,
// FedProx and SCAFFOLD, trains the MLP on three sites to a useful model. The ten experiments are
// submitted at once: four run side by side (the director's limit) and the
// others wait their turn. Three sites are as many as Krum needs tolerating
// no Byzantine site (2f+3); its selection is tested with Byzantine updates in
// the aggregator's and tensor's tests.
func TestAggregationAlgorithms(t *testing.T) {
	sites := []string{"site-1", "site-2", "site-3"}
	f := newFed(t, []string{"alice"}, sites)
	f.startDirector(directorOptions{})
	for i, s := range sites {
		f.startEnvoy(s, syntheticShard(i+1, 3, ""))
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, sites...)

	algorithms := map[string]string{
		"fedavg":       "{algorithm: fedavg}",
		"median":       "{algorithm: median}",
		"trimmed_mean": "{algorithm: trimmed_mean, trim: 0.34}",
		"krum":         "{algorithm: krum, byzantine: 0}",
		"multi_krum":   "{algorithm: multi_krum, byzantine: 0, select: 2}",
		"fedadam":      "{algorithm: fedadam, lr: 0.1}",
		"fedyogi":      "{algorithm: fedyogi, lr: 0.1}",
		"fedadagrad":   "{algorithm: fedadagrad, lr: 0.5}",
		// FedProx: FedAvg with the proximal term in the sites' training.
		"fedprox": "{algorithm: fedavg}\ntraining: {proximal_mu: 0.1}",
		// SCAFFOLD: control variates at the server and the sites.
		"scaffold": "{algorithm: scaffold}",
	}
	for alg, spec := range algorithms {
		plan := syntheticPlan("agg-"+strings.ReplaceAll(alg, "_", "-"), 3, "", "")
		plan = strings.Replace(plan, "participants: {min: 2,", "participants: {min: 3,", 1)
		plan = strings.Replace(plan, "aggregation: {algorithm: fedavg}", "aggregation: "+spec, 1)
		f.submit("alice", writePlan(t, plan))
	}
	for alg := range algorithms {
		name := "agg-" + strings.ReplaceAll(alg, "_", "-")
		e := f.waitState(c, name, 2*time.Minute, fxv1.ExperimentState_FINISHED)
		acc := e.GetLatestMetrics()
		t.Logf("%s: best %v, last round's metrics %v", alg, e.GetBest(), acc)
		if b := e.GetBest(); b == nil || b.GetValue() < 0.6 {
			t.Errorf("%s: best model %v, want accuracy ≥ 0.6 on the easy synthetic data", alg, b)
		}
	}
}
