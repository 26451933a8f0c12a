package app

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fx-fl/fx/tensor"
)

// The quickstart runs a whole federation and an experiment, shows each
// round's model with its validation, the best model beside its own
// validation metrics, scores it on the test split, saves it usable, and on
// a second run keeps the PKI it made the first time.
func TestQuickstart(t *testing.T) {
	work := t.TempDir()
	args := []string{"quickstart", "--workdir", work, "--data", "synthetic", "--envoys", "2", "--rounds", "2"}
	out, err := run(t, args...)
	if err != nil {
		t.Fatalf("fx quickstart: %v\n%s", err, out)
	}
	for _, want := range []string{"data: a generated data set", "round 1/2", "round 2/2", "best model: round", "on the validation data of both envoys", "test: the best model on the 1000 generated test samples", "federation stopped"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	checkBestBesideItsMetrics(t, out, 2)
	acc := regexp.MustCompile(`test: .* accuracy=(0\.\d+)`).FindStringSubmatch(out)
	if acc == nil || acc[1] < "0.5" {
		t.Errorf("test accuracy %v: the synthetic data is learnable, want ≥ 0.5", acc)
	}
	m, _, err := tensor.ReadFile(filepath.Join(work, "best.safetensors"))
	if err != nil || len(m) == 0 {
		t.Fatalf("best model: %v", err)
	}
	for _, f := range []string{"director.yaml", "envoys/envoy-1.yaml", "logs/director.log", "pki/ca/root.crt"} {
		if _, err := os.Stat(filepath.Join(work, f)); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}

	root, _ := os.ReadFile(filepath.Join(work, "pki", "ca", "root.crt"))
	if out, err := run(t, args...); err != nil {
		t.Fatalf("second fx quickstart: %v\n%s", err, out)
	}
	again, _ := os.ReadFile(filepath.Join(work, "pki", "ca", "root.crt"))
	if !bytes.Equal(root, again) {
		t.Fatal("the second run replaced the CA")
	}
}

// checkBestBesideItsMetrics checks that the best model's line shows the
// validation of that round's model, as its round line does.
func checkBestBesideItsMetrics(t *testing.T, out string, rounds int) {
	t.Helper()
	best := regexp.MustCompile(`best model: round (\d+) of \d+, validation (accuracy=\S+ loss=\S+) on`).FindStringSubmatch(out)
	if best == nil {
		t.Fatalf("no best model line with its validation metrics:\n%s", out)
	}
	round := regexp.MustCompile(fmt.Sprintf(`round %s/%d .* global model: validation (accuracy=\S+ loss=\S+)`, best[1], rounds)).FindStringSubmatch(out)
	if round == nil || round[1] != best[2] {
		t.Errorf("the best model (round %s) is shown with %s, but its round's model validated %v:\n%s", best[1], best[2], round, out)
	}
}

// syncBuffer is a bytes.Buffer safe to read while a command writes to it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// With --keep-running the federation stays up after the experiment until
// the context ends (Ctrl-C), and the profile quickstart wrote connects the
// researcher's CLI to it; then it stops cleanly.
func TestQuickstartKeepRunning(t *testing.T) {
	work := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	done := make(chan error, 1)
	go func() {
		cmd := newRootCommand()
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs([]string{"quickstart", "--workdir", work, "--data", "synthetic", "--envoys", "2", "--rounds", "1", "--keep-running"})
		done <- cmd.ExecuteContext(ctx)
	}()
	profile := filepath.Join(work, profileFile)
	deadline := time.Now().Add(3 * time.Minute)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(out.String(), "keeps running") {
		select {
		case err := <-done:
			t.Fatalf("quickstart --keep-running ended before keeping the federation up: %v\n%s", err, out.String())
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			t.Fatalf("quickstart --keep-running did not finish its experiment within 3 minutes:\n%s", out.String())
		}
	}
	if !strings.Contains(out.String(), "export FX_PROFILE="+profile) {
		t.Errorf("the output does not say how to use the profile:\n%s", out.String())
	}

	// The CLI reaches the running federation through the profile alone,
	// from another directory (its paths are relative to the profile).
	inDir(t, t.TempDir())
	t.Setenv(profileEnv, profile)
	list, err := run(t, "experiment", "list")
	if err != nil || !strings.Contains(list, "quickstart-synthetic-mlp") || !strings.Contains(list, "FINISHED") {
		t.Fatalf("fx experiment list through the profile: %v\n%s", err, list)
	}
	envoys, err := run(t, "envoys", "list", "--profile", profile)
	if err != nil || strings.Count(envoys, " yes ") != 2 {
		t.Errorf("fx envoys list: %v\n%s", err, envoys)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("quickstart --keep-running stopped with %v", err)
		}
		// A run without --keep-running leaves no profile naming a
		// federation that is gone.
		if out, err := run(t, "quickstart", "--workdir", work, "--data", "synthetic", "--envoys", "1", "--rounds", "1"); err != nil {
			t.Fatalf("fx quickstart: %v\n%s", err, out)
		}
		if _, err := os.Stat(profile); !os.IsNotExist(err) {
			t.Errorf("%s is left from the --keep-running run: %v", profile, err)
		}
	case <-time.After(time.Minute):
		t.Fatal("quickstart --keep-running did not stop within a minute of Ctrl-C")
	}
	if !strings.Contains(out.String(), "federation stopped") {
		t.Errorf("no word of the federation stopping:\n%s", out.String())
	}
}

func TestQuickstartBadFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		says string
	}{
		{[]string{"--envoys", "0"}, "--envoys"},
		{[]string{"--rounds", "0"}, "--rounds"},
		{[]string{"--data", "mnist"}, "--data"},
	} {
		_, err := run(t, append([]string{"quickstart", "--workdir", t.TempDir()}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%v: error %v, want it to name %s", tc.args, err, tc.says)
		}
	}
}
