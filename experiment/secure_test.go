package experiment

import (
	"errors"
	"strings"
	"testing"
)

func TestAggregationSecure(t *testing.T) {
	const head = "name: e\nrounds: 2\nrunner: {kind: builtin, model: mlp}\n"
	cases := []struct {
		name, yaml string
		key, wants string // "" for a valid plan
		threshold  int
		rng        float64
	}{
		{"fedavg, defaults", "participants: {min: 3}\naggregation: {secure: true}\n", "", "", 2, DefaultSecureRange},
		{"default majority of five", "participants: {min: 5}\naggregation: {secure: true}\n", "", "", 3, DefaultSecureRange},
		{"fedadam with settings", "participants: {min: 4}\naggregation: {algorithm: fedadam, secure: true, secure_threshold: 4, secure_range: 0.5}\n", "", "", 4, 0.5},
		{"equal weights", "participants: {min: 2}\naggregation: {secure: true, weights: equal}\n", "", "", 2, DefaultSecureRange},
		{"with personalised layers", "participants: {min: 2}\naggregation: {secure: true, local: ['fc2.*']}\n", "", "", 2, DefaultSecureRange},
		{"median", "participants: {min: 3}\naggregation: {algorithm: median, secure: true}\n", "aggregation.secure", "cannot be combined with algorithm median: it needs each site's update", 0, 0},
		{"trimmed mean", "participants: {min: 3}\naggregation: {algorithm: trimmed_mean, trim: 0.1, secure: true}\n", "aggregation.secure", "algorithm trimmed_mean", 0, 0},
		{"krum", "participants: {min: 3}\naggregation: {algorithm: krum, secure: true}\n", "aggregation.secure", "algorithm krum", 0, 0},
		{"multi-krum", "participants: {min: 3}\naggregation: {algorithm: multi_krum, secure: true}\n", "aggregation.secure", "algorithm multi_krum", 0, 0},
		{"registered weights", "participants: {min: 3}\naggregation: {secure: true, weights: registered}\n", "aggregation.secure", "weights: registered", 0, 0},
		{"one participant", "participants: {min: 1}\naggregation: {secure: true}\n", "aggregation.secure", "needs at least 2 participants", 0, 0},
		{"an evaluation", "participants: {min: 2}\naggregation: {secure: true}\ntasks: [aggregated_model_validation]\n", "aggregation.secure", "do not train", 0, 0},
		{"threshold one", "participants: {min: 3}\naggregation: {secure: true, secure_threshold: 1}\n", "aggregation.secure_threshold", "at least 2", 0, 0},
		{"threshold negative", "participants: {min: 3}\naggregation: {secure: true, secure_threshold: -2}\n", "aggregation.secure_threshold", "at least 2", 0, 0},
		{"threshold above min", "participants: {min: 3}\naggregation: {secure: true, secure_threshold: 4}\n", "aggregation.secure_threshold", "above participants.min 3", 0, 0},
		{"threshold without secure", "participants: {min: 3}\naggregation: {secure_threshold: 2}\n", "aggregation.secure_threshold", "only used with secure: true", 0, 0},
		{"range without secure", "participants: {min: 3}\naggregation: {secure_range: 2}\n", "aggregation.secure_range", "only used with secure: true", 0, 0},
		{"range negative", "participants: {min: 3}\naggregation: {secure: true, secure_range: -1}\n", "aggregation.secure_range", "[2^-60, 2^30]", 0, 0},
		{"range too large", "participants: {min: 3}\naggregation: {secure: true, secure_range: 2e9}\n", "aggregation.secure_range", "[2^-60, 2^30]", 0, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := ParsePlan([]byte(head + c.yaml))
			if c.key == "" {
				if err != nil {
					t.Fatal(err)
				}
				if got := p.SecureThresholdOrDefault(); got != c.threshold {
					t.Errorf("threshold %d, want %d", got, c.threshold)
				}
				if got := p.SecureRangeOrDefault(); got != c.rng {
					t.Errorf("range %v, want %v", got, c.rng)
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

// A strategy the binary registered looks at each update (that is what
// strategies are for), so it does not combine with secure aggregation
// either, nor does another binary's strategy that an envoy cannot check.
func TestAggregationSecureRefusesStrategies(t *testing.T) {
	const plan = "name: e\nrounds: 2\nrunner: {kind: builtin, model: mlp}\nparticipants: {min: 3}\naggregation: {algorithm: securetest_geo, secure: true}\n"
	RegisterAlgorithm("securetest_geo", nil)
	for _, parse := range []func([]byte) (*Plan, error){ParsePlan, ParsePlanAnyAlgorithm} {
		_, err := parse([]byte(plan))
		if err == nil || !strings.Contains(err.Error(), "aggregation.secure: cannot be combined with algorithm securetest_geo") {
			t.Fatalf("got %v", err)
		}
	}
}
