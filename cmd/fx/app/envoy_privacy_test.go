package app

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/envoy"
	"github.com/fx-fl/fx/privacy"
)

// TestEnvoyPrivacyCommand: `fx envoy privacy` shows the budget, what each
// experiment spent and the rounds left, as a table, JSON or YAML.
func TestEnvoyPrivacyCommand(t *testing.T) {
	files, _ := envoyCerts(t)
	work, err := os.MkdirTemp("", "fx-envoy-privacy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	cfgFile := writeEnvoyConfig(t, "director: {address: 127.0.0.1:1}\n"+
		"tls: {cert: "+files.Cert+", key: "+files.Key+", ca: "+files.CA+"}\n"+
		"work_dir: "+work+"\n"+
		"shard: {kind: synthetic, train_samples: 20, valid_samples: 4}\n"+
		"privacy: {require_dp: true, budget: {epsilon: 3, delta: 1e-5, min_noise_multiplier: 2}}\n")
	cfg, err := loadEnvoyConfig(cfgFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := (privacy.Budget{Epsilon: 3, Delta: 1e-5, MinNoise: 2}); !cfg.Privacy.RequireDP || cfg.Privacy.Budget != want {
		t.Fatalf("privacy settings loaded as %+v", cfg.Privacy)
	}
	l, err := privacy.Open(filepath.Join(work, "privacy.json"))
	if err != nil {
		t.Fatal(err)
	}
	for r := 1; r <= 2; r++ {
		c := privacy.Charge{Experiment: "x1", Name: "rita/study", Round: r, SampledGaussian: privacy.SampledGaussian{Noise: 5, Rate: 1, Steps: 1}, Clip: 1}
		if _, err := l.Charge("envoy-1", cfg.Privacy.Budget, c); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	startEnvoy(t, cfg, true)

	var out string
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err = run(t, "envoy", "privacy", "--config", cfgFile)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("fx envoy privacy: %v", err)
	}
	for _, want := range []string{
		"budget: ε = 3 at δ = 1e-05 per dataset; noise multiplier at least 2; differential privacy required for every experiment",
		"dataset envoy-1 (this envoy's data): ε ", " left",
		"rita/study", "x1", "2 (1–2)",
		"σ", "ROUNDS LEFT",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("fx envoy privacy lacks %q:\n%s", want, out)
		}
	}
	out, err = run(t, "envoy", "privacy", "--config", cfgFile, "--noise", "5,1", "--output", "json")
	if err != nil {
		t.Fatal(err)
	}
	var st envoy.PrivacyStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%v:\n%s", err, out)
	}
	if len(st.Datasets) != 1 || len(st.Datasets[0].Experiments) != 1 || st.Datasets[0].Experiments[0].Rounds != 2 {
		t.Fatalf("fx envoy privacy --output json: %s", out)
	}
	rl := st.Datasets[0].RoundsLeft
	if len(rl) != 2 || rl[0].Noise != 1 || rl[0].Refused == "" || rl[1].Noise != 5 || rl[1].Rounds != 9 {
		t.Errorf("rounds left at σ 1 and 5: %+v, want none at 1 (below the minimum) and 9 at 5 (11 fit, 2 spent)", rl)
	}
	if out, err := run(t, "envoy", "privacy", "--config", cfgFile, "--output", "yaml"); err != nil || !strings.HasPrefix(out, "---\n") || !strings.Contains(out, "epsilon_spent:") {
		t.Errorf("fx envoy privacy --output yaml = %q, %v", out, err)
	}
	if _, err := run(t, "envoy", "privacy", "--config", cfgFile, "--noise", "-1"); err == nil || !strings.Contains(err.Error(), "noise multiplier -1") {
		t.Errorf("fx envoy privacy --noise -1: %v", err)
	}
}
