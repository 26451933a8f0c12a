package builtin

import (
	"slices"
	"strings"
	"testing"
)

func TestParseHyperparameters(t *testing.T) {
	tests := []struct {
		name  string
		model string
		hyper map[string]any
		want  Hyperparameters
	}{
		{"mlp defaults", ModelMLP, nil, Hyperparameters{
			Hidden: []int{DefaultHidden}, LR: DefaultLR, Momentum: DefaultMomentum, BatchSize: DefaultBatchSize, Epochs: DefaultEpochs}},
		{"softmax defaults", ModelSoftmax, map[string]any{}, Hyperparameters{
			LR: DefaultLR, Momentum: DefaultMomentum, BatchSize: DefaultBatchSize, Epochs: DefaultEpochs}},
		{"as YAML decodes", ModelMLP, map[string]any{
			"hidden": []any{256, 128}, "lr": 0.1, "momentum": 0, "batch_size": 32, "epochs": 2, "seed": 7, "weight_decay": 1e-4,
		}, Hyperparameters{Hidden: []int{256, 128}, LR: 0.1, BatchSize: 32, Epochs: 2, Seed: 7, WeightDecay: 1e-4}},
		{"as JSON decodes", ModelMLP, map[string]any{
			"hidden": []any{64.0}, "lr": 1.0, "batch_size": 16.0, "epochs": 3.0, "seed": -2.0,
		}, Hyperparameters{Hidden: []int{64}, LR: 1, Momentum: DefaultMomentum, BatchSize: 16, Epochs: 3, Seed: -2}},
		{"typed values", ModelMLP, map[string]any{
			"hidden": []int{8, 4}, "lr": float32(0.5), "batch_size": int64(8), "seed": uint64(1 << 40), "momentum": int8(0),
		}, Hyperparameters{Hidden: []int{8, 4}, LR: 0.5, BatchSize: 8, Epochs: DefaultEpochs, Seed: 1 << 40}},
		{"softmax with empty hidden", ModelSoftmax, map[string]any{"hidden": []any{}}, Hyperparameters{
			Hidden: []int{}, LR: DefaultLR, Momentum: DefaultMomentum, BatchSize: DefaultBatchSize, Epochs: DefaultEpochs}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseHyperparameters(tc.model, tc.hyper)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.Hidden, tc.want.Hidden) || got.LR != tc.want.LR || got.Momentum != tc.want.Momentum ||
				got.BatchSize != tc.want.BatchSize || got.Epochs != tc.want.Epochs || got.Seed != tc.want.Seed ||
				got.WeightDecay != tc.want.WeightDecay {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestParseHyperparametersErrors(t *testing.T) {
	tests := []struct {
		name  string
		model string
		hyper map[string]any
		want  []string
	}{
		{"unknown model", "cnn", nil, []string{`unknown model "cnn"`}},
		{"unknown key", ModelMLP, map[string]any{"learning_rate": 0.1}, []string{`unknown hyper-parameter "learning_rate"`, "lr"}},
		{"string number", ModelMLP, map[string]any{"lr": "0.1"}, []string{`"lr"`, "want a number"}},
		{"zero lr", ModelMLP, map[string]any{"lr": 0}, []string{`"lr"`, "positive"}},
		{"momentum 1", ModelMLP, map[string]any{"momentum": 1.0}, []string{`"momentum"`, "[0, 1)"}},
		{"fractional batch", ModelMLP, map[string]any{"batch_size": 32.5}, []string{`"batch_size"`, "integer"}},
		{"zero epochs", ModelMLP, map[string]any{"epochs": 0}, []string{`"epochs"`, "1..10000"}},
		{"negative decay", ModelMLP, map[string]any{"weight_decay": -0.1}, []string{`"weight_decay"`}},
		{"hidden not a list", ModelMLP, map[string]any{"hidden": 128}, []string{`"hidden"`, "list of integers"}},
		{"hidden bad element", ModelMLP, map[string]any{"hidden": []any{64, "x"}}, []string{`"hidden"`, "element 1"}},
		{"hidden zero width", ModelMLP, map[string]any{"hidden": []any{0}}, []string{`"hidden"`, "width 0"}},
		{"mlp without hidden", ModelMLP, map[string]any{"hidden": []any{}}, []string{"at least one hidden layer"}},
		{"softmax with hidden", ModelSoftmax, map[string]any{"hidden": []any{10}}, []string{"no hidden layers"}},
		{"bool seed", ModelMLP, map[string]any{"seed": true}, []string{`"seed"`, "integer"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseHyperparameters(tc.model, tc.hyper)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}
