package experiment

import (
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
)

// TestAsyncPlanRules: the asynchronous plan's keys, their defaults, and
// every combination it refuses, each naming its key and the way out.
func TestAsyncPlanRules(t *testing.T) {
	const four = "participants: {min: 4}\n"
	cases := []struct {
		name string
		yaml string
		keys []string
		msg  string
	}{
		{"async with defaults", base + builtinRunner + "aggregation: {mode: async}\n", nil, ""},
		{"async, buffer 3 of 4", base + builtinRunner + four + "aggregation: {mode: async, buffer: 3}\n", nil, ""},
		{"async with every key", base + builtinRunner + four + "aggregation: {mode: async, buffer: 2, lr: 0.5, weights: equal, staleness: {function: polynomial, exponent: 1, max: 3}}\ntraining: {proximal_mu: 0.01}\n", nil, ""},
		{"async, constant staleness", base + builtinRunner + "aggregation: {mode: async, staleness: {function: constant, max: 2}}\n", nil, ""},
		{"sync spelled out", base + builtinRunner + "aggregation: {mode: sync}\n", nil, ""},

		{"unknown mode", base + builtinRunner + "aggregation: {mode: buffered}\n", []string{"aggregation.mode"}, `must be sync (the default`},
		{"buffer without async", base + builtinRunner + "aggregation: {buffer: 2}\n", []string{"aggregation.buffer"}, "only used with mode: async"},
		{"staleness without async", base + builtinRunner + "aggregation: {staleness: {max: 2}}\n", []string{"aggregation.staleness"}, "only used with mode: async"},
		{"negative buffer", base + builtinRunner + "aggregation: {mode: async, buffer: -1}\n", []string{"aggregation.buffer"}, "must be at least 1"},
		{"buffer above participants.min", base + builtinRunner + "participants: {min: 2}\naggregation: {mode: async, buffer: 3}\n", []string{"aggregation.buffer"}, "could never fill a step"},
		{"unknown staleness function", base + builtinRunner + "aggregation: {mode: async, staleness: {function: hinge}}\n", []string{"aggregation.staleness.function"}, "polynomial"},
		{"negative exponent", base + builtinRunner + "aggregation: {mode: async, staleness: {exponent: -1}}\n", []string{"aggregation.staleness.exponent"}, "≥ 0"},
		{"exponent with constant", base + builtinRunner + "aggregation: {mode: async, staleness: {function: constant, exponent: 2}}\n", []string{"aggregation.staleness.exponent"}, "only used with function: polynomial"},
		{"negative max", base + builtinRunner + "aggregation: {mode: async, staleness: {max: -2}}\n", []string{"aggregation.staleness.max"}, "must be at least 1"},

		{"min_reporting above buffer", base + builtinRunner + four + "aggregation: {mode: async, buffer: 2}\nstragglers: {min_reporting: 3}\n", []string{"stragglers.min_reporting"}, "closes with buffer 2 updates"},
		{"min_reporting above the default buffer", base + builtinRunner + four + "aggregation: {mode: async}\nstragglers: {min_reporting: 4}\n", []string{"stragglers.min_reporting"}, "the default buffer (participants − 1, 3 with participants.min 4)"},
		{"min_reporting at buffer", base + builtinRunner + four + "aggregation: {mode: async, buffer: 3}\nstragglers: {min_reporting: 3}\n", nil, ""},
		{"async with median", base + builtinRunner + "aggregation: {mode: async, algorithm: median}\n", []string{"aggregation.mode"}, "cannot be combined with algorithm median"},
		{"async with trimmed_mean", base + builtinRunner + "aggregation: {mode: async, algorithm: trimmed_mean}\n", []string{"aggregation.mode"}, "cannot be combined with algorithm trimmed_mean"},
		{"async with krum", base + builtinRunner + "participants: {min: 5}\naggregation: {mode: async, algorithm: krum}\n", []string{"aggregation.mode"}, "cannot be combined with algorithm krum"},
		{"async with scaffold", base + builtinRunner + "aggregation: {mode: async, algorithm: scaffold}\n", []string{"aggregation.mode"}, "cannot be combined with scaffold"},
		{"async with fedadam", base + builtinRunner + "aggregation: {mode: async, algorithm: fedadam}\n", []string{"aggregation.mode"}, "cannot be combined with fedadam"},
		{"async with secure", base + builtinRunner + "participants: {min: 3}\naggregation: {mode: async, secure: true}\n", []string{"aggregation.secure"}, "cannot be combined with mode: async"},
		{"async with dp", base + builtinRunner + "aggregation: {mode: async}\nprivacy: {dp: {noise_multiplier: 5, clip_norm: 1}}\n", []string{"privacy.dp"}, "cannot be combined with mode: async"},
		{"async with local", base + builtinRunner + "aggregation: {mode: async, local: ['fc2.*']}\n", []string{"aggregation.local"}, "cannot be combined with mode: async"},
		{"async evaluation", "name: exp\nrounds: 1\n" + builtinRunner + "tasks: [aggregated_model_validation]\naggregation: {mode: async}\n", []string{"aggregation.mode"}, "do not train"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := ParsePlan([]byte(c.yaml))
			if len(c.keys) == 0 {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if back, err := ParsePlan(must(p.Marshal())); err != nil || !reflect.DeepEqual(back, p) {
					t.Errorf("plan does not survive Marshal: %v\n%+v\n%+v", err, back, p)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error; want problems %v %q", c.keys, c.msg)
			}
			if !strings.Contains(err.Error(), c.msg) {
				t.Errorf("error %q does not contain %q", err, c.msg)
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("want a *ValidationError, got %T: %v", err, err)
			}
			var got []string
			for _, pr := range ve.Problems {
				got = append(got, pr.Key)
			}
			if !reflect.DeepEqual(got, c.keys) {
				t.Errorf("problems name %v, want %v (%v)", got, c.keys, err)
			}
		})
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

// TestAsyncDefaults: K is all participants but one unless the plan says,
// never more than the participants; the staleness weight is FedBuff's
// 1/√(1+s) by default, (1+s)^-a with an exponent, 1 when constant; the
// server learning rate is 1 unless lr says.
func TestAsyncDefaults(t *testing.T) {
	p, err := ParsePlan([]byte(base + builtinRunner + "aggregation: {mode: async}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !p.Async() {
		t.Fatal("mode async is not Async")
	}
	for parts, want := range map[int]int{1: 1, 2: 1, 4: 3, 10: 9} {
		if got := p.BufferFor(parts); got != want {
			t.Errorf("BufferFor(%d) = %d, want %d", parts, got, want)
		}
	}
	p.Aggregation.Buffer = 3
	if got := p.BufferFor(2); got != 2 {
		t.Errorf("buffer 3 with 2 participants: BufferFor = %d, want 2", got)
	}
	if got := p.BufferFor(5); got != 3 {
		t.Errorf("buffer 3 with 5 participants: BufferFor = %d, want 3", got)
	}
	if p.MaxStaleness() != DefaultMaxStaleness || p.AsyncLR() != 1 {
		t.Errorf("max staleness %d, lr %v; want %d, 1", p.MaxStaleness(), p.AsyncLR(), DefaultMaxStaleness)
	}
	weights := map[int]float64{0: 1, 1: 1 / math.Sqrt2, 3: 0.5, 8: 1.0 / 3}
	for s, want := range weights {
		if got := p.StalenessWeight(s); math.Abs(got-want) > 1e-12 {
			t.Errorf("default StalenessWeight(%d) = %v, want %v", s, got, want)
		}
	}
	p.Aggregation.Staleness.Exponent = 1
	if got := p.StalenessWeight(3); got != 0.25 {
		t.Errorf("exponent 1: StalenessWeight(3) = %v, want 0.25", got)
	}
	p.Aggregation.Staleness = Staleness{Function: StalenessConstant, Max: 4}
	if got := p.StalenessWeight(3); got != 1 || p.MaxStaleness() != 4 {
		t.Errorf("constant: StalenessWeight(3) = %v, max %d; want 1, 4", got, p.MaxStaleness())
	}
	p.Aggregation.LR = 0.5
	if p.AsyncLR() != 0.5 {
		t.Errorf("lr 0.5: AsyncLR = %v", p.AsyncLR())
	}
	sync, err := ParsePlan([]byte(base + builtinRunner))
	if err != nil || sync.Async() || sync.StalenessWeight(0) != 1 {
		t.Errorf("a plan without mode is asynchronous or weighs fresh updates by %v (%v)", sync.StalenessWeight(0), err)
	}
}
