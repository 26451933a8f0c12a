package experiment

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/runner"
)

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParsePlanMinimalGetsDefaults(t *testing.T) {
	p, err := ParsePlan(readTestdata(t, "minimal.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultPlan()
	want.Name = "minimal"
	want.Rounds = 3
	want.Runner.Kind = RunnerBuiltin
	want.Runner.Model = ModelSoftmax
	if !reflect.DeepEqual(*p, want) {
		t.Fatalf("got  %+v\nwant %+v", *p, want)
	}
	// The documented defaults, spelled out once more so a change to one is
	// a deliberate change to both.
	checks := []struct {
		name      string
		got, want any
	}{
		{"participants.min", p.Participants.Min, 1},
		{"participants.accept_timeout", p.Participants.AcceptTimeout.Std(), 30 * time.Minute},
		{"participants.max", p.Participants.Max, 0},
		{"participants.gather_timeout", p.Participants.GatherTimeout.Std(), time.Minute},
		{"runner.timeout", p.Runner.Timeout.Std(), 30 * time.Minute},
		{"runner.seed", p.Runner.Seed, int64(1)},
		{"aggregation.algorithm", p.Aggregation.Algorithm, "fedavg"},
		{"aggregation.weights", p.Aggregation.Weights, "samples"},
		{"aggregation.trim", p.Aggregation.Trim, 0.1},
		{"aggregation.byzantine", p.Aggregation.Byzantine, 1},
		{"aggregation.select", p.Aggregation.Select, 0},
		{"aggregation.lr", p.Aggregation.LR, 0.0},
		{"training.proximal_mu", p.Training.ProximalMu, 0.0},
		{"stragglers.deadline", p.Stragglers.Deadline.Std(), 10 * time.Minute},
		{"stragglers.min_reporting", p.Stragglers.MinReporting, 1},
		{"stragglers.percent", p.Stragglers.Percent, 1.0},
		{"tasks", p.Tasks, []string{"aggregated_model_validation", "train", "locally_tuned_model_validation"}},
		{"best_model.metric", p.BestModel.Metric, "accuracy"},
		{"best_model.mode", p.BestModel.Mode, "max"},
		{"best_model.task", p.BestModel.Task, "aggregated_model_validation"},
		{"retention.every", p.Retention.Every, 1},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s: got %v, want %v", c.name, c.got, c.want)
		}
	}
}

func TestParsePlanFull(t *testing.T) {
	p, err := ParsePlan(readTestdata(t, "full.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	want := Plan{
		Name:   "fashion-mlp",
		Rounds: 10,
		Participants: Participants{
			Min:           2,
			Max:           3,
			Envoys:        []string{"site-a", "site-b", "site-c"},
			Tags:          []string{"fashion-mnist"},
			SampleShape:   []int64{28, 28},
			TargetShape:   []int64{1},
			AcceptTimeout: Duration(time.Hour),
			GatherTimeout: Duration(2 * time.Minute),
		},
		Runner: RunnerSpec{
			Kind:    RunnerBuiltin,
			Model:   ModelMLP,
			Timeout: Duration(90 * time.Second),
			Seed:    42,
			Hyperparameters: map[string]any{
				"hidden":     []any{128, 64},
				"lr":         0.05,
				"batch_size": 32,
				"epochs":     1,
				"momentum":   0.9,
			},
		},
		Aggregation: Aggregation{Algorithm: AlgFedAdam, Weights: WeightsSamples, Trim: 0.2, Byzantine: DefaultByzantine, LR: 0.01, Beta1: 0.9, Beta2: 0.99, Tau: 0.001},
		Training:    Training{ProximalMu: 0.01},
		Stragglers:  Stragglers{Deadline: Duration(5 * time.Minute), MinReporting: 2, Percent: 0.75},
		Tasks:       []string{runner.TaskTrain, runner.TaskLocalValidation},
		BestModel:   BestModel{Metric: "loss", Mode: ModeMin, Task: runner.TaskLocalValidation},
		Retention:   Retention{Every: 5},
	}
	if !reflect.DeepEqual(*p, want) {
		t.Fatalf("got  %#v\nwant %#v", *p, want)
	}
}

func TestPlanMarshalRoundTrip(t *testing.T) {
	for _, file := range []string{"full.yaml", "minimal.yaml", "exec.yaml"} {
		t.Run(file, func(t *testing.T) {
			p, err := ParsePlan(readTestdata(t, file))
			if err != nil {
				t.Fatal(err)
			}
			out, err := p.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			q, err := ParsePlan(out)
			if err != nil {
				t.Fatalf("re-parsing marshalled plan: %v\n%s", err, out)
			}
			if !reflect.DeepEqual(p, q) {
				t.Fatalf("round trip changed the plan:\nbefore %#v\nafter  %#v\nyaml:\n%s", p, q, out)
			}
			again, err := q.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			if string(again) != string(out) {
				t.Fatalf("Marshal is not stable:\n%s\n---\n%s", out, again)
			}
		})
	}
}

// TestPlanPrivacyRoundTrip: a plan's DP parameters survive Marshal and
// JSON, and a plan without them marshals without a privacy key.
func TestPlanPrivacyRoundTrip(t *testing.T) {
	p, err := ParsePlan([]byte(base + builtinRunner + "privacy: {dp: {noise_multiplier: 5.5, clip_norm: 0.5, delta: 1e-6}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := DP{NoiseMultiplier: 5.5, ClipNorm: 0.5, Delta: 1e-6}
	if p.Privacy.DP == nil || *p.Privacy.DP != want {
		t.Fatalf("privacy.dp is %+v, want %+v", p.Privacy.DP, want)
	}
	out, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	q, err := ParsePlan(out)
	if err != nil || !reflect.DeepEqual(p, q) {
		t.Fatalf("round trip: %v\n%s", err, out)
	}
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var j Plan
	if err := json.Unmarshal(b, &j); err != nil || j.Privacy.DP == nil || *j.Privacy.DP != want {
		t.Fatalf("through JSON: %v %s", err, b)
	}

	plain, err := ParsePlan([]byte(base + builtinRunner))
	if err != nil {
		t.Fatal(err)
	}
	out, err = plain.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := json.Marshal(plain); strings.Contains(string(out), "privacy") || strings.Contains(string(b), "privacy") {
		t.Errorf("a plan without DP marshals a privacy key:\n%s\n%s", out, b)
	}
}

func TestPlanMarshalWritesDurationsAsWritten(t *testing.T) {
	p, err := ParsePlan(readTestdata(t, "full.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	out, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"accept_timeout: 1h\n", "timeout: 1m30s\n", "deadline: 5m\n"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("marshalled plan lacks %q:\n%s", want, out)
		}
	}
}

func TestPlanJSON(t *testing.T) {
	p, err := ParsePlan(readTestdata(t, "full.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"deadline":"5m"`) {
		t.Errorf("JSON should carry durations as strings: %s", b)
	}
	var q Plan
	if err := json.Unmarshal(b, &q); err != nil {
		t.Fatal(err)
	}
	if q.Stragglers.Deadline != p.Stragglers.Deadline || q.Participants.AcceptTimeout != p.Participants.AcceptTimeout {
		t.Errorf("durations changed through JSON: %+v", q)
	}
}

func TestDurationString(t *testing.T) {
	for _, c := range []struct {
		in   string
		want string
	}{
		{"10m", "10m"},
		{"90s", "1m30s"},
		{"1h", "1h"},
		{"1h30m", "1h30m"},
		{"2h0m5s", "2h0m5s"},
		{"1.5s", "1.5s"},
		{"0s", "0s"},
		{" 30m ", "30m"},
	} {
		d, err := ParseDuration(c.in)
		if err != nil {
			t.Fatalf("%q: %v", c.in, err)
		}
		if got := d.String(); got != c.want {
			t.Errorf("%q: String() = %q, want %q", c.in, got, c.want)
		}
		back, err := ParseDuration(d.String())
		if err != nil || back != d {
			t.Errorf("%q: String() does not parse back: %v, %v", c.in, back, err)
		}
	}
	for _, bad := range []string{"", "600", "ten minutes", "5 min"} {
		if _, err := ParseDuration(bad); err == nil {
			t.Errorf("ParseDuration(%q) succeeded", bad)
		}
	}
}

// base is a valid plan, to which each validation case adds its own keys.
const base = "name: exp\nrounds: 2\n"
const builtinRunner = "runner: {kind: builtin, model: mlp}\n"

func TestParsePlanRules(t *testing.T) {
	cases := []struct {
		name string
		yaml string
		// keys are the key paths the problems must name, in order; empty
		// means the plan is valid.
		keys []string
		// msg, when set, must appear in the error.
		msg string
	}{
		{"minimal builtin", base + builtinRunner, nil, ""},
		{"exec", base + "runner: {kind: exec, command: [./train.sh]}\n", nil, ""},

		{"name missing", "rounds: 2\n" + builtinRunner, []string{"name"}, "name: required"},
		{"name with path characters", "name: ../x\nrounds: 2\n" + builtinRunner, []string{"name"}, `name: "../x": use letters, digits`},
		{"name with slash", "name: a/b\nrounds: 2\n" + builtinRunner, []string{"name"}, ""},
		{"name starting with dot", "name: .hidden\nrounds: 2\n" + builtinRunner, []string{"name"}, "must not start with"},
		{"name too long", "name: " + strings.Repeat("a", 65) + "\nrounds: 2\n" + builtinRunner, []string{"name"}, "at most 64"},

		{"rounds missing", "name: exp\n" + builtinRunner, []string{"rounds"}, "rounds: required"},
		{"rounds zero", "name: exp\nrounds: 0\n" + builtinRunner, []string{"rounds"}, ""},
		{"rounds negative", "name: exp\nrounds: -1\n" + builtinRunner, []string{"rounds"}, "got -1"},
		{"rounds over the limit", "name: exp\nrounds: 1000000000\n" + builtinRunner, []string{"rounds"}, "rounds: 1000000000 is over the limit of 10000"},
		{"retention negative", base + builtinRunner + "retention: {every: -1}\n", []string{"retention.every"}, "got -1"},

		{"participants.min zero", base + builtinRunner + "participants: {min: 0}\n", []string{"participants.min"}, "participants.min: must be at least 1, got 0"},
		{"participants.min above envoys", base + builtinRunner + "participants: {min: 3, envoys: [a, b]}\n", []string{"participants.min"}, "lists only 2 envoys"},
		{"participants.min equal to envoys", base + builtinRunner + "participants: {min: 2, envoys: [a, b]}\n", nil, ""},
		{"participants.min with any envoy", base + builtinRunner + "participants: {min: 5}\n", nil, ""},
		{"participants.envoys bad name", base + builtinRunner + "participants: {envoys: [ok, ../etc]}\n", []string{"participants.envoys[1]"}, `"../etc"`},
		{"participants.envoys duplicate", base + builtinRunner + "participants: {envoys: [a, b, a]}\n", []string{"participants.envoys[2]"}, "already listed at participants.envoys[0]"},
		{"participants.tags empty", base + builtinRunner + "participants: {tags: [x, '']}\n", []string{"participants.tags[1]"}, ""},
		{"participants.tags duplicate", base + builtinRunner + "participants: {tags: [x, x]}\n", []string{"participants.tags[1]"}, ""},
		{"participants.sample_shape zero", base + builtinRunner + "participants: {sample_shape: [28, 0]}\n", []string{"participants.sample_shape[1]"}, ""},
		{"participants.target_shape negative", base + builtinRunner + "participants: {target_shape: [-1]}\n", []string{"participants.target_shape[0]"}, ""},
		{"participants.accept_timeout zero", base + builtinRunner + "participants: {accept_timeout: 0s}\n", []string{"participants.accept_timeout"}, ""},
		{"participants.accept_timeout negative", base + builtinRunner + "participants: {accept_timeout: -5m}\n", []string{"participants.accept_timeout"}, "got -5m"},
		{"participants.max below min", base + builtinRunner + "participants: {min: 3, max: 2}\n", []string{"participants.max"}, "participants.max: is 2 but participants.min is 3"},
		{"participants.max negative", base + builtinRunner + "participants: {max: -1}\n", []string{"participants.max"}, "got -1"},
		{"participants.max equal to min", base + builtinRunner + "participants: {min: 2, max: 2}\n", nil, ""},
		{"participants.gather_timeout zero starts at min", base + builtinRunner + "participants: {gather_timeout: 0s}\n", nil, ""},
		{"participants.gather_timeout negative", base + builtinRunner + "participants: {gather_timeout: -1m}\n", []string{"participants.gather_timeout"}, "got -1m"},

		{"runner missing", base, []string{"runner.kind"}, "runner.kind: required"},
		{"runner.kind unknown", base + "runner: {kind: docker}\n", []string{"runner.kind"}, `got "docker"`},
		{"runner.model missing", base + "runner: {kind: builtin}\n", []string{"runner.model"}, "softmax or mlp"},
		{"runner.model unknown", base + "runner: {kind: builtin, model: resnet}\n", []string{"runner.model"}, `got "resnet"`},
		{"runner.command with builtin", base + "runner: {kind: builtin, model: mlp, command: [x]}\n", []string{"runner.command"}, "only used with kind exec"},
		{"runner.command missing", base + "runner: {kind: exec}\n", []string{"runner.command"}, "required with kind exec"},
		{"runner.command empty", base + "runner: {kind: exec, command: []}\n", []string{"runner.command"}, ""},
		{"runner.command empty program", base + "runner: {kind: exec, command: ['', x]}\n", []string{"runner.command[0]"}, ""},
		{"runner.model with exec", base + "runner: {kind: exec, command: [x], model: mlp}\n", []string{"runner.model"}, "only used with kind builtin"},
		{"builtin hyperparameter misspelt", base + "runner: {kind: builtin, model: mlp, hyperparameters: {hiden: [64]}}\n", []string{"runner.hyperparameters"}, "hiden"},
		{"builtin hyperparameter out of range", base + "runner: {kind: builtin, model: mlp, hyperparameters: {lr: -1}}\n", []string{"runner.hyperparameters"}, "lr"},
		{"runner.mode unknown", base + "runner: {kind: exec, command: [x], mode: forking}\n", []string{"runner.mode"}, `got "forking"`},
		{"runner.mode with builtin", base + "runner: {kind: builtin, model: mlp, mode: per_task}\n", []string{"runner.mode"}, "only used with kind exec"},
		{"runner.timeout zero", base + "runner: {kind: builtin, model: mlp, timeout: 0s}\n", []string{"runner.timeout"}, ""},
		{"runner.seed zero is fine", base + "runner: {kind: builtin, model: mlp, seed: 0}\n", nil, ""},
		{"runner.hyperparameters non-string keys", base + "runner: {kind: exec, command: [x], hyperparameters: {layers: {1: 2}}}\n", []string{"runner.hyperparameters.layers"}, "keys must be strings"},
		{"runner.hyperparameters NaN", base + "runner: {kind: exec, command: [x], hyperparameters: {opt: {lr: .nan}}}\n", []string{"runner.hyperparameters.opt.lr"}, "finite"},
		{"runner.hyperparameters Inf in a list", base + "runner: {kind: exec, command: [x], hyperparameters: {xs: [1, .inf]}}\n", []string{"runner.hyperparameters.xs[1]"}, ""},

		{"aggregation.algorithm unknown", base + builtinRunner + "aggregation: {algorithm: bulyan}\n", []string{"aggregation.algorithm"}, `krum, multi_krum, fedadam, fedyogi, fedadagrad, scaffold or test-clipped, got "bulyan"`},
		{"aggregation.algorithm empty", base + builtinRunner + "aggregation: {algorithm: ''}\n", []string{"aggregation.algorithm"}, ""},
		{"aggregation.trim 0.5", base + builtinRunner + "aggregation: {algorithm: trimmed_mean, trim: 0.5}\n", []string{"aggregation.trim"}, "must be in [0,0.5), got 0.5"},
		{"aggregation.trim negative", base + builtinRunner + "aggregation: {trim: -0.1}\n", []string{"aggregation.trim"}, ""},
		{"aggregation.trim zero", base + builtinRunner + "aggregation: {algorithm: trimmed_mean, trim: 0}\n", nil, ""},
		{"aggregation.lr negative", base + builtinRunner + "aggregation: {algorithm: fedyogi, lr: -1}\n", []string{"aggregation.lr"}, ""},
		{"aggregation.lr infinite", base + builtinRunner + "aggregation: {algorithm: fedyogi, lr: .inf}\n", []string{"aggregation.lr"}, ""},
		{"aggregation.beta1 one", base + builtinRunner + "aggregation: {algorithm: fedadam, beta1: 1}\n", []string{"aggregation.beta1"}, ""},
		{"aggregation.beta2 NaN", base + builtinRunner + "aggregation: {algorithm: fedadam, beta2: .nan}\n", []string{"aggregation.beta2"}, ""},
		{"aggregation.tau negative", base + builtinRunner + "aggregation: {algorithm: fedadagrad, tau: -0.001}\n", []string{"aggregation.tau"}, ""},
		{"every algorithm", base + builtinRunner + "aggregation: {algorithm: median}\n", nil, ""},
		{"aggregation.weights registered", base + builtinRunner + "aggregation: {weights: registered}\n", nil, ""},
		{"aggregation.weights equal", base + builtinRunner + "aggregation: {algorithm: fedadam, weights: equal}\n", nil, ""},
		{"aggregation.weights unknown", base + builtinRunner + "aggregation: {weights: reported}\n", []string{"aggregation.weights"}, `samples (the reported samples, at most those registered), registered (the envoy's registered train samples) or equal, got "reported"`},
		{"aggregation.weights empty", base + builtinRunner + "aggregation: {weights: ''}\n", []string{"aggregation.weights"}, ""},
		{"krum tolerating the default one", base + builtinRunner + "participants: {min: 5}\naggregation: {algorithm: krum}\n", nil, ""},
		{"krum tolerating none", base + builtinRunner + "participants: {min: 3}\naggregation: {algorithm: krum, byzantine: 0}\n", nil, ""},
		{"krum with too few participants", base + builtinRunner + "participants: {min: 5}\naggregation: {algorithm: krum, byzantine: 2}\n", []string{"aggregation.byzantine"},
			"aggregation.byzantine: is 2, so krum needs at least 2f+3 = 7 updates a round, but participants.min is 5: raise participants.min to 7 or lower byzantine to 1"},
		{"krum with the default participants.min", base + builtinRunner + "aggregation: {algorithm: multi_krum}\n", []string{"aggregation.byzantine"},
			"multi_krum needs at least 2f+3 = 5 updates a round, but participants.min is 1: raise participants.min to 5 (even byzantine 0 needs 3)"},
		{"byzantine negative", base + builtinRunner + "participants: {min: 5}\naggregation: {algorithm: krum, byzantine: -1}\n", []string{"aggregation.byzantine"}, "must be 0 or more"},
		{"byzantine fraction", base + builtinRunner + "aggregation: {byzantine: 0.5}\n", []string{"aggregation.byzantine"}, "want an integer"},
		{"byzantine ignored by fedavg", base + builtinRunner + "aggregation: {algorithm: fedavg, byzantine: 9}\n", nil, ""},
		{"multi_krum select", base + builtinRunner + "participants: {min: 6}\naggregation: {algorithm: multi_krum, byzantine: 1, select: 5}\n", nil, ""},
		{"multi_krum select above n−f", base + builtinRunner + "participants: {min: 6}\naggregation: {algorithm: multi_krum, byzantine: 1, select: 6}\n", []string{"aggregation.select"},
			"aggregation.select: is 6, but a round of participants.min = 6 updates with byzantine 1 holds only 5 honest ones: select at most 5"},
		{"multi_krum select negative", base + builtinRunner + "participants: {min: 6}\naggregation: {algorithm: multi_krum, select: -2}\n", []string{"aggregation.select"}, "got -2"},
		{"select with krum", base + builtinRunner + "participants: {min: 5}\naggregation: {algorithm: krum, select: 2}\n", []string{"aggregation.select"}, "only used with algorithm multi_krum, not krum"},
		{"select with median", base + builtinRunner + "aggregation: {algorithm: median, select: 2}\n", []string{"aggregation.select"}, "not median"},

		{"stragglers.deadline zero", base + builtinRunner + "stragglers: {deadline: 0s}\n", []string{"stragglers.deadline"}, "must not wait forever"},
		{"stragglers.deadline bare number", base + builtinRunner + "stragglers: {deadline: 600}\n", []string{"stragglers.deadline"}, `line 4: stragglers.deadline: "600" is not a duration`},
		{"stragglers.deadline words", base + builtinRunner + "stragglers: {deadline: ten minutes}\n", []string{"stragglers.deadline"}, "not a duration"},
		{"stragglers.deadline mapping", base + builtinRunner + "stragglers: {deadline: {m: 10}}\n", []string{"stragglers.deadline"}, "not a duration"},
		{"stragglers.min_reporting fraction", base + builtinRunner + "stragglers: {min_reporting: 0.5}\n", []string{"stragglers.min_reporting"}, "want an integer, got 0.5"},
		{"stragglers.min_reporting zero", base + builtinRunner + "stragglers: {min_reporting: 0}\n", []string{"stragglers.min_reporting"}, ""},
		{"stragglers.min_reporting above participants.min", base + builtinRunner + "participants: {min: 2}\nstragglers: {min_reporting: 3}\n", []string{"stragglers.min_reporting"}, "could never close a round"},
		{"stragglers.percent too high", base + builtinRunner + "stragglers: {percent: 1.5}\n", []string{"stragglers.percent"}, "stragglers.percent: must be in (0,1], got 1.5"},
		{"stragglers.percent zero", base + builtinRunner + "stragglers: {percent: 0}\n", []string{"stragglers.percent"}, ""},
		{"stragglers.percent NaN", base + builtinRunner + "stragglers: {percent: .nan}\n", []string{"stragglers.percent"}, ""},

		{"tasks empty", base + builtinRunner + "tasks: []\n", []string{"tasks", "best_model.task"}, "must list at least train"},
		{"tasks null", base + builtinRunner + "tasks:\n", []string{"tasks", "best_model.task"}, ""},
		{"evaluation", "name: exp\nrounds: 1\n" + builtinRunner + "tasks: [aggregated_model_validation]\n", nil, ""},
		{"evaluation of several rounds", base + builtinRunner + "tasks: [aggregated_model_validation]\n", []string{"rounds"},
			"rounds: is 2, but an evaluation (tasks without train) scores the given model once: set rounds: 1"},
		{"local validation without train", "name: exp\nrounds: 1\n" + builtinRunner + "tasks: [aggregated_model_validation, locally_tuned_model_validation]\n", []string{"tasks[1]"},
			"there is no train: add train before it, or list only aggregated_model_validation"},
		{"evaluation judged on a task it does not run", "name: exp\nrounds: 1\n" + builtinRunner + "tasks: [aggregated_model_validation]\nbest_model: {task: locally_tuned_model_validation}\n",
			[]string{"best_model.task"}, "is not in tasks"},
		{"tasks unknown", base + builtinRunner + "tasks: [train, evaluate]\n", []string{"tasks[1]", "best_model.task"}, `unknown task "evaluate"`},
		{"tasks duplicate", base + builtinRunner + "tasks: [aggregated_model_validation, train, train]\n", []string{"tasks[2]"}, "already listed at tasks[1]"},
		{"tasks local validation before train", base + builtinRunner + "tasks: [aggregated_model_validation, locally_tuned_model_validation, train]\n", []string{"tasks[1]"}, "must come after train"},
		{"tasks train only needs a best_model task", base + builtinRunner + "tasks: [train]\n", []string{"best_model.task"}, "is not in tasks"},

		{"training.proximal_mu", base + builtinRunner + "training: {proximal_mu: 0.01}\n", nil, ""},

		{"scaffold", base + builtinRunner + "aggregation: {algorithm: scaffold}\n", nil, ""},
		{"scaffold with a server lr and fedprox", base + builtinRunner + "aggregation: {algorithm: scaffold, lr: 0.5, weights: equal}\ntraining: {proximal_mu: 0.01}\n", nil, ""},
		{"scaffold with exec", base + "runner: {kind: exec, command: [./train.sh]}\naggregation: {algorithm: scaffold}\n", nil, ""},
		{"scaffold with exec per task", base + "runner: {kind: exec, command: [./train.sh], mode: per_task}\naggregation: {algorithm: scaffold}\n", []string{"aggregation.algorithm"}, "persistent runner protocol only"},
		{"scaffold with local", base + builtinRunner + "aggregation: {algorithm: scaffold, local: ['fc1.*']}\n", []string{"aggregation.local"}, "cannot be combined with scaffold yet"},
		{"scaffold with dp", base + builtinRunner + "aggregation: {algorithm: scaffold}\nprivacy: {dp: {noise_multiplier: 5, clip_norm: 1, delta: 1e-5}}\n", []string{"privacy.dp"}, "cannot be combined with scaffold yet"},
		{"scaffold with secure", base + builtinRunner + "participants: {min: 3}\naggregation: {algorithm: scaffold, secure: true}\n", []string{"aggregation.secure"}, "the control variates are not masked"},
		{"scaffold with beta1", base + builtinRunner + "aggregation: {algorithm: scaffold, beta1: 0.9}\n", []string{"aggregation.algorithm"}, "scaffold takes only lr"},
		{"scaffold in an evaluation", "name: exp\nrounds: 1\n" + builtinRunner + "tasks: [aggregated_model_validation]\naggregation: {algorithm: scaffold}\n", []string{"aggregation.algorithm"}, "this plan's tasks do not train"},
		{"training.proximal_mu zero", base + builtinRunner + "training: {proximal_mu: 0}\n", nil, ""},
		{"training.proximal_mu with a server optimiser", base + builtinRunner + "aggregation: {algorithm: fedadam}\ntraining: {proximal_mu: 1}\n", nil, ""},
		{"training.proximal_mu negative", base + builtinRunner + "training: {proximal_mu: -0.1}\n", []string{"training.proximal_mu"}, "training.proximal_mu: must be a finite number ≥ 0"},
		{"training.proximal_mu NaN", base + builtinRunner + "training: {proximal_mu: .nan}\n", []string{"training.proximal_mu"}, "got NaN"},
		{"training.proximal_mu infinite", base + builtinRunner + "training: {proximal_mu: .inf}\n", []string{"training.proximal_mu"}, "got +Inf"},
		{"training.proximal_mu a string", base + builtinRunner + "training: {proximal_mu: small}\n", []string{"training.proximal_mu"}, "want a number"},
		{"training.proximal_mu in an evaluation", "name: exp\nrounds: 1\n" + builtinRunner + "tasks: [aggregated_model_validation]\ntraining: {proximal_mu: 0.1}\n",
			[]string{"training.proximal_mu"}, "only used by the train task"},
		{"training unknown key", base + builtinRunner + "training: {mu: 0.1}\n", []string{"training.mu"}, "unknown key (training takes proximal_mu)"},

		{"best_model.metric empty", base + builtinRunner + "best_model: {metric: ''}\n", []string{"best_model.metric"}, ""},
		{"best_model.mode unknown", base + builtinRunner + "best_model: {mode: maximum}\n", []string{"best_model.mode"}, `got "maximum"`},
		{"best_model.task train", base + builtinRunner + "best_model: {task: train}\n", []string{"best_model.task"}, "not train"},
		{"best_model.task unknown", base + builtinRunner + "best_model: {task: foo}\n", []string{"best_model.task"}, ""},
		{"best_model.task local", base + builtinRunner + "best_model: {task: locally_tuned_model_validation, metric: loss, mode: min}\n", nil, ""},

		{"privacy.dp", base + builtinRunner + "privacy: {dp: {noise_multiplier: 5, clip_norm: 1, delta: 1e-5}}\n", nil, ""},
		{"privacy.dp without delta", base + builtinRunner + "privacy: {dp: {noise_multiplier: 5, clip_norm: 1}}\n", nil, ""},
		{"privacy.dp with any aggregation", base + builtinRunner + "aggregation: {algorithm: median}\nprivacy: {dp: {noise_multiplier: 5, clip_norm: 1}}\n", nil, ""},
		{"privacy.dp empty", base + builtinRunner + "privacy: {dp: {}}\n", []string{"privacy.dp.noise_multiplier", "privacy.dp.clip_norm"}, "privacy.dp.noise_multiplier: must be a finite number > 0"},
		{"privacy.dp bad numbers", base + builtinRunner + "privacy: {dp: {noise_multiplier: -1, clip_norm: .inf, delta: 1}}\n",
			[]string{"privacy.dp.noise_multiplier", "privacy.dp.clip_norm", "privacy.dp.delta"}, "privacy.dp.delta: must be in (0,1)"},
		{"privacy.dp unknown key", base + builtinRunner + "privacy: {dp: {noise_multiplier: 5, clip_norm: 1, epsilon: 3}}\n", []string{"privacy.dp.epsilon"}, "privacy.dp.epsilon: unknown key (privacy.dp takes noise_multiplier, clip_norm, delta)"},
		{"privacy.dp wrong type", base + builtinRunner + "privacy: {dp: {noise_multiplier: lots, clip_norm: 1}}\n", []string{"privacy.dp.noise_multiplier"}, ""},
		{"privacy unknown key", base + builtinRunner + "privacy: {secure: true}\n", []string{"privacy.secure"}, "privacy takes dp"},

		{"unknown top-level key", base + builtinRunner + "roundz: 3\n", []string{"roundz"}, "line 4: roundz: unknown key"},
		{"unknown nested key", base + builtinRunner + "participants:\n  min: 1\n  mn: 2\n", []string{"participants.mn"}, "line 6: participants.mn: unknown key (participants takes min, max, envoys"},
		{"unknown keys everywhere", "name: exp\nrounds: 2\nrunner: {kind: builtin, model: mlp, modle: x}\nstragglers: {dedline: 5m}\nextra: 1\n", []string{"runner.modle", "stragglers.dedline", "extra"}, "line 3: runner.modle"},
		{"exec hyperparameters are free-form", base + "runner: {kind: exec, command: [x], hyperparameters: {anything: {goes: [1, 2]}}}\n", nil, ""},
		{"wrong type", "name: exp\nrounds: many\n" + builtinRunner, []string{"rounds"}, "line 2: rounds: want an integer, got a string `many`"},
		{"list for a mapping", base + builtinRunner + "participants: [a, b]\n", []string{"participants"}, "participants: want a mapping, got a list"},
		{"mapping in a list", base + builtinRunner + "participants: {envoys: [a, {b: c}], min: 1}\n", []string{"participants.envoys[1]"}, "want a string, got a mapping"},
		{"several wrong types", "name: exp\nrounds: 2\nrunner: {kind: builtin, model: mlp, seed: abc}\nstragglers: {deadline: 600, min_reporting: x}\n",
			[]string{"runner.seed", "stragglers.deadline", "stragglers.min_reporting"}, `line 4: stragglers.deadline: "600" is not a duration`},
		{"fraction for an integer", "name: exp\nrounds: 1.5\n" + builtinRunner, []string{"rounds"}, "line 2: rounds: want an integer, got 1.5"},
		{"fraction in an integer list", base + builtinRunner + "participants: {sample_shape: [28, 2.5]}\n", []string{"participants.sample_shape[1]"}, "want an integer, got 2.5"},
		{"duplicate key", base + builtinRunner + "rounds: 3\n", []string{"rounds"}, `line 4: rounds: mapping key "rounds" already defined at line 2`},
		{"not a mapping", "- name: exp\n", nil, "a plan is a mapping"},
		{"empty", "", nil, "the plan is empty"},
		{"only a comment", "# nothing\n", nil, "the plan is empty"},
		{"two documents", base + builtinRunner + "---\nname: other\n", nil, "a second YAML document"},
		{"syntax error", "name: [exp\n", nil, "yaml:"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := ParsePlan([]byte(c.yaml))
			wantErr := len(c.keys) > 0 || c.msg != ""
			if !wantErr {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if p == nil {
					t.Fatal("nil plan without an error")
				}
				return
			}
			if err == nil {
				t.Fatalf("no error; want problems %v %q", c.keys, c.msg)
			}
			if p != nil {
				t.Errorf("got a plan with an error")
			}
			if !errors.Is(err, ErrInvalidPlan) {
				t.Errorf("error does not match ErrInvalidPlan: %v", err)
			}
			if c.msg != "" && !strings.Contains(err.Error(), c.msg) {
				t.Errorf("error %q does not contain %q", err, c.msg)
			}
			if len(c.keys) > 0 {
				var ve *ValidationError
				if !errors.As(err, &ve) {
					t.Fatalf("want a *ValidationError naming %v, got %T: %v", c.keys, err, err)
				}
				var got []string
				for _, pr := range ve.Problems {
					got = append(got, pr.Key)
				}
				if !reflect.DeepEqual(got, c.keys) {
					t.Errorf("problems name %v, want %v (%v)", got, c.keys, err)
				}
			}
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	p := DefaultPlan()
	p.Name = "bad/name"
	p.Rounds = 0
	p.Runner.Kind = "exec"
	p.Aggregation.Trim = 0.7
	p.Stragglers.Percent = 1.5
	p.Stragglers.Deadline = 0
	p.Tasks = []string{"locally_tuned_model_validation"}
	p.BestModel.Mode = "up"
	err := p.Validate()
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("want *ValidationError, got %v", err)
	}
	want := []string{"name", "rounds", "runner.command", "aggregation.trim", "stragglers.deadline", "stragglers.percent", "tasks[0]", "best_model.mode", "best_model.task"}
	var got []string
	for _, pr := range ve.Problems {
		got = append(got, pr.Key)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("problems %v, want %v\n%v", got, want, err)
	}
	if !strings.Contains(err.Error(), "stragglers.percent: must be in (0,1], got 1.5") {
		t.Errorf("message lacks the percent problem: %v", err)
	}
}

func TestEvaluationPlan(t *testing.T) {
	eval, err := ParsePlan([]byte("name: eval\nrounds: 1\n" + builtinRunner + "tasks: [aggregated_model_validation]\n"))
	if err != nil {
		t.Fatal(err)
	}
	train, err := ParsePlan([]byte(base + builtinRunner))
	if err != nil {
		t.Fatal(err)
	}
	exec, err := ParsePlan([]byte(base + "runner: {kind: exec, command: [x]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name       string
		p          *Plan
		evaluation bool
		training   int
		need       string // a part of InitialModelNeed; "" for none
	}{
		{"evaluation", eval, true, 0, "an evaluation (tasks without train) scores the model you give it"},
		{"builtin training", train, false, 2, ""},
		{"exec training", exec, false, 2, "runner kind exec needs the initial model"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := c.p.Evaluation(); got != c.evaluation {
				t.Errorf("Evaluation() = %v, want %v", got, c.evaluation)
			}
			if got := c.p.TrainingRounds(); got != c.training {
				t.Errorf("TrainingRounds() = %d, want %d", got, c.training)
			}
			got := c.p.InitialModelNeed()
			if (c.need == "") != (got == "") || !strings.Contains(got, c.need) {
				t.Errorf("InitialModelNeed() = %q, want one containing %q", got, c.need)
			}
		})
	}
}

func TestValidateGoBuiltPlan(t *testing.T) {
	p := DefaultPlan()
	p.Name = "from-go"
	p.Rounds = 1
	p.Runner = RunnerSpec{Kind: RunnerExec, Command: []string{"python3", "train.py"}, Timeout: Duration(time.Minute)}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	var zero Plan
	if err := zero.Validate(); err == nil {
		t.Fatal("a zero plan validated: defaults must come from DefaultPlan, not be invented by Validate")
	}
}

func TestDefaultPlanIsFresh(t *testing.T) {
	a := DefaultPlan()
	a.Tasks[0] = "changed"
	if b := DefaultPlan(); b.Tasks[0] != runner.TaskAggregatedValidation {
		t.Fatal("DefaultPlan shares its task slice between calls")
	}
}

func TestProblemString(t *testing.T) {
	if got := (Problem{Key: "a.b", Line: 3, Message: "bad"}).String(); got != "line 3: a.b: bad" {
		t.Errorf("got %q", got)
	}
	if got := (Problem{Key: "a.b", Message: "bad"}).String(); got != "a.b: bad" {
		t.Errorf("got %q", got)
	}
}

// TestParseStoredPlanSkipsNewLimits: a plan the director stored before
// rounds were bounded still loads (and only there).
func TestParseStoredPlanSkipsNewLimits(t *testing.T) {
	plan := []byte("name: exp\nrounds: 1000000000\nrunner: {kind: builtin, model: mlp}\n")
	if _, err := ParsePlan(plan); err == nil {
		t.Fatal("ParsePlan took rounds over MaxRounds")
	}
	p, err := ParseStoredPlan(plan)
	if err != nil || p.Rounds != 1000000000 {
		t.Fatalf("ParseStoredPlan = %+v, %v", p, err)
	}
	if err := p.Validate(); err == nil {
		t.Fatal("Validate took rounds over MaxRounds")
	}
	if _, err := ParseStoredPlan([]byte("name: exp\nrounds: 2\nrunner: {kind: nope}\n")); err == nil {
		t.Fatal("ParseStoredPlan took an invalid plan")
	}
}

func TestKeptModels(t *testing.T) {
	for _, c := range []struct{ rounds, every, want int }{
		{10, 1, 11}, {10, 0, 4}, {10, 5, 6}, {1000, 10, 104}, {2, 0, 3}, {1, 1, 2},
	} {
		p := DefaultPlan()
		p.Rounds, p.Retention.Every = c.rounds, c.every
		if got := p.KeptModels(); got != c.want {
			t.Errorf("rounds %d every %d: KeptModels = %d, want %d", c.rounds, c.every, got, c.want)
		}
	}
}

// TestParsePlanReportsEveryProblemAtOnce: unknown keys and values of the
// wrong type come back together, in line order, one a line.
func TestParsePlanReportsEveryProblemAtOnce(t *testing.T) {
	_, err := ParsePlan([]byte("name: x\nrounds: ten\nparticipants: {min: many}\nrunner: {kind: builtin, model: mlp, timeout: 5}\ncolour: red\n"))
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("error %v, want a *ValidationError", err)
	}
	var keys []string
	for _, p := range ve.Problems {
		keys = append(keys, p.Key)
	}
	if want := []string{"rounds", "participants.min", "runner.timeout", "colour"}; !slices.Equal(keys, want) {
		t.Errorf("problems name %v, want %v in line order", keys, want)
	}
	if lines := strings.Split(err.Error(), "\n"); len(lines) != 5 || !strings.HasPrefix(lines[1], "  line 2: rounds") {
		t.Errorf("error %q: want a header and one line per problem", err)
	}
}

// testStrategy is registered once per test binary (registration is for
// the process's life, and a second one panics).
const testStrategy = "test-clipped"

func init() {
	RegisterAlgorithm(testStrategy, func(options map[string]any) error {
		switch c := options["clip"].(type) {
		case int:
			if c <= 0 {
				return errors.New("clip must be > 0")
			}
		case float64:
			if c <= 0 {
				return errors.New("clip must be > 0")
			}
		}
		return nil
	})
}

func TestRegisteredAlgorithms(t *testing.T) {
	const base = "name: e\nrounds: 1\nrunner: {kind: builtin, model: mlp}\n"
	cases := []struct {
		name       string
		parse      func([]byte) (*Plan, error)
		yaml       string
		key, wants string // the problem's key and part of its message; "" for a valid plan
	}{
		{"registered", ParsePlan, "aggregation: {algorithm: test-clipped, options: {clip: 2.5, note: x}}\n", "", ""},
		{"registered without options", ParsePlan, "aggregation: {algorithm: test-clipped}\n", "", ""},
		{"the strategy's own check", ParsePlan, "aggregation: {algorithm: test-clipped, options: {clip: -1}}\n", "aggregation.options", "for test-clipped: clip must be > 0"},
		{"options must be JSON", ParsePlan, "aggregation: {algorithm: test-clipped, options: {clip: .nan}}\n", "aggregation.options.clip", "finite"},
		{"options with a built-in", ParsePlan, "aggregation: {algorithm: median, options: {clip: 1}}\n", "aggregation.options", "median is built in"},
		{"unregistered lists built-in and registered", ParsePlan, "aggregation: {algorithm: geomedian}\n", "aggregation.algorithm", `fedyogi, fedadagrad, scaffold or test-clipped, got "geomedian"`},
		{"unregistered where nothing aggregates", ParsePlanAnyAlgorithm, "aggregation: {algorithm: geomedian, options: {iterations: 5}}\n", "", ""},
		{"malformed where nothing aggregates", ParsePlanAnyAlgorithm, "aggregation: {algorithm: ../x}\n", "aggregation.algorithm", `got "../x"`},
		{"stored plans load", ParseStoredPlan, "aggregation: {algorithm: geomedian}\n", "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := c.parse([]byte(base + c.yaml))
			if c.key == "" {
				if err != nil {
					t.Fatal(err)
				}
				if again, err := p.Marshal(); err != nil || !strings.Contains(string(again), "algorithm: ") {
					t.Fatalf("marshal: %v\n%s", err, again)
				}
				return
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("want a ValidationError, got %v", err)
			}
			for _, pr := range ve.Problems {
				if pr.Key == c.key && strings.Contains(pr.Message, c.wants) {
					return
				}
			}
			t.Fatalf("want %s: …%s…, got %v", c.key, c.wants, err)
		})
	}
	if got := Algorithms(); got[len(got)-1] != testStrategy || !slices.Contains(got, AlgKrum) {
		t.Fatalf("Algorithms() = %v", got)
	}
	// A plan with a strategy survives Marshal and ParsePlan unchanged.
	p, err := ParsePlan([]byte(base + "aggregation: {algorithm: test-clipped, options: {clip: 2.5, nested: {a: [1, 2]}}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParsePlan(b)
	if err != nil || !reflect.DeepEqual(back, p) {
		t.Fatalf("round trip: %v\n%+v\n%+v", err, back, p)
	}
}

func TestRegisterAlgorithmRefusesMistakes(t *testing.T) {
	for _, name := range []string{"fedavg", testStrategy, "Geo", "", "a/b"} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("RegisterAlgorithm(%q) did not panic", name)
				}
			}()
			RegisterAlgorithm(name, nil)
		}()
	}
}

func TestAggregationLocal(t *testing.T) {
	const base = "name: e\nrounds: 2\nrunner: {kind: builtin, model: mlp}\n"
	cases := []struct {
		name, yaml string
		key, wants string // "" for a valid plan
	}{
		{"names and patterns", "aggregation: {local: [fc2.weight, 'fc2.*', 'bn?.*']}\n", "", ""},
		{"with a robust algorithm", "participants: {min: 3}\naggregation: {algorithm: krum, byzantine: 0, local: ['fc2.*']}\n", "", ""},
		{"bad pattern", "aggregation: {local: ['fc[2']}\n", "aggregation.local[0]", `pattern such as fc2.*`},
		{"empty", "aggregation: {local: ['']}\n", "aggregation.local[0]", ""},
		{"duplicate", "aggregation: {local: [a, a]}\n", "aggregation.local[1]", "already listed at aggregation.local[0]"},
		{"an evaluation trains nothing", "rounds: 1\ntasks: [aggregated_model_validation]\naggregation: {local: ['fc2.*']}\n", "aggregation.local", "do not train"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			yaml := base + c.yaml
			if strings.HasPrefix(c.yaml, "rounds:") {
				yaml = strings.Replace(base, "rounds: 2\n", "", 1) + c.yaml
			}
			p, err := ParsePlan([]byte(yaml))
			if c.key == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !p.Aggregation.IsLocal("fc2.weight") || !p.Aggregation.IsLocal("fc2.bias") || p.Aggregation.IsLocal("fc1.weight") {
					t.Fatalf("IsLocal with %v", p.Aggregation.Local)
				}
				return
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("want a ValidationError, got %v", err)
			}
			for _, pr := range ve.Problems {
				if pr.Key == c.key && strings.Contains(pr.Message, c.wants) {
					return
				}
			}
			t.Fatalf("want %s: …%s…, got %v", c.key, c.wants, err)
		})
	}
}
