package app

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fx-fl/fx/internal/testfed"
	"github.com/fx-fl/fx/pki"
	"github.com/fx-fl/fx/tensor"
)

// researchFederation is a real director and two envoys with synthetic
// data, over mutual TLS on loopback, for driving the researcher's commands
// in-process. profile is a profile file for researcher alice whose
// certificate paths are relative to it.
type researchFederation struct {
	*testfed.Federation
	profile string
}

func newResearchFederation(t *testing.T) *researchFederation {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end federation")
	}
	// Keep a developer's own ~/.config/fx/config.yaml and FX_* settings
	// out of the tests.
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	for _, k := range []string{"FX_PROFILE", "FX_DIRECTOR", "FX_SERVER_NAME", "FX_CERT", "FX_KEY", "FX_CA", "FX_TIMEOUT"} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	f := &researchFederation{Federation: testfed.New(t)}

	alice := f.CA.Files(pki.RoleResearcher, "alice")
	f.profile = filepath.Join(filepath.Dir(alice.Cert), "config.yaml")
	profile := fmt.Sprintf("director: %s\nserver_name: localhost\ncert: %s\nkey: %s\nca: %s\n",
		f.Addr, filepath.Base(alice.Cert), filepath.Base(alice.Key), filepath.Base(alice.CA))
	if err := os.WriteFile(f.profile, []byte(profile), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// loopbackAddr is a loopback address nothing listens on (yet).
// fx runs the command tree in-process with args and returns stdout, stderr
// and the error main would print.
func fx(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := newRootCommand()
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	err = cmd.Execute()
	return out.String(), errOut.String(), err
}

// writePlan writes an experiment directory with a synthetic-data plan.
func writePlan(t *testing.T, name string, rounds, min int) string {
	t.Helper()
	dir := t.TempDir()
	plan := fmt.Sprintf("name: %s\nrounds: %d\nparticipants: {min: %d, tags: [synthetic]}\nrunner: {kind: builtin, model: softmax, hyperparameters: {lr: 0.1}}\nstragglers: {deadline: 1m}\n", name, rounds, min)
	if err := os.WriteFile(filepath.Join(dir, "plan.yaml"), []byte(plan), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// waitForSites waits until the director lists both envoys.
func waitForSites(t *testing.T, profile string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, _, err := fx(t, "envoys", "list", "--profile", profile, "--online")
		if err == nil && strings.Contains(out, "site-1") && strings.Contains(out, "site-2") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("envoys never came online: %q, %v", out, err)
		}
	}
}

// TestExperimentCommands drives a whole experiment through the CLI against a
// real federation: list the envoys, submit and wait, list, status, watch,
// download a model and remove it, in table and JSON output.
func TestExperimentCommands(t *testing.T) {
	f := newResearchFederation(t)
	p := []string{"--profile", f.profile}
	waitForSites(t, f.profile)

	out, _, err := fx(t, append([]string{"envoys", "list", "--output", "json"}, p...)...)
	var envoys struct {
		Envoys []struct {
			Name   string `json:"name"`
			Online bool   `json:"online"`
		} `json:"envoys"`
	}
	if err != nil || json.Unmarshal([]byte(out), &envoys) != nil || len(envoys.Envoys) != 2 {
		t.Fatalf("envoys list --output json = %q, %v", out, err)
	}
	if out, _, err := fx(t, append([]string{"envoys", "list", "--tags", "mri"}, p...)...); err != nil || !strings.Contains(out, "no envoys") {
		t.Errorf("envoys list --tags mri = %q, %v", out, err)
	}
	if out, _, err := fx(t, append([]string{"envoys", "search", "--tags", "synthetic"}, p...)...); err != nil || strings.Count(out, "\nsite-") != 2 {
		t.Errorf("envoys search = %q, %v", out, err)
	}

	out, stderr, err := fx(t, append([]string{"experiment", "submit", writePlan(t, "synth", 2, 2), "--name", "run-1", "--wait"}, p...)...)
	if err != nil {
		t.Fatalf("submit --wait: %v\n%s", err, out)
	}
	if !strings.Contains(out, "submitted run-1") || !strings.Contains(out, "FINISHED  round 2/2") || !strings.Contains(out, "accuracy=") {
		t.Errorf("submit --wait printed:\n%s", out)
	}
	if stderr != "" {
		t.Errorf("submit drew on a stderr that is not a terminal: %q", stderr)
	}

	out, _, err = fx(t, append([]string{"experiment", "list"}, p...)...)
	if err != nil || !strings.Contains(out, "run-1") || !strings.Contains(out, "FINISHED") || !strings.Contains(out, "2/2") {
		t.Errorf("list = %q, %v", out, err)
	}
	out, _, err = fx(t, append([]string{"experiment", "list", "--state", "running", "--output", "json"}, p...)...)
	if err != nil || strings.TrimSpace(out) != "{}" {
		t.Errorf("list --state running --output json = %q, %v", out, err)
	}
	if _, _, err := fx(t, append([]string{"experiment", "list", "--state", "sleeping"}, p...)...); err == nil || !strings.Contains(err.Error(), "sleeping") {
		t.Errorf("list --state sleeping: %v", err)
	}

	out, _, err = fx(t, append([]string{"experiment", "status", "run-1"}, p...)...)
	if err != nil || !strings.Contains(out, "FINISHED") || !strings.Contains(out, "site-1") || !strings.Contains(out, "COMPLETED") {
		t.Errorf("status = %q, %v", out, err)
	}
	out, _, err = fx(t, append([]string{"experiment", "status", "run-1", "--output", "json"}, p...)...)
	var status struct {
		Name  string `json:"name"`
		State string `json:"state"`
		Round int    `json:"round"`
	}
	if err != nil || json.Unmarshal([]byte(out), &status) != nil || status.State != "FINISHED" || status.Round != 2 {
		t.Errorf("status --output json = %q, %v", out, err)
	}

	out, _, err = fx(t, append([]string{"experiment", "watch", "run-1"}, p...)...)
	if err != nil || strings.Count(out, "\n") != 21+2 || !strings.Contains(out, "run-1 ended FINISHED") {
		t.Errorf("watch = %q, %v", out, err)
	}
	out, _, err = fx(t, append([]string{"experiment", "watch", "run-1", "--after", "18", "--output", "json"}, p...)...)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if err != nil || len(lines) != 3 {
		t.Fatalf("watch --after 18 --output json = %q, %v", out, err)
	}
	for i, line := range lines {
		var ev struct {
			Sequence int64 `json:"sequence"` // a number, not protojson's string
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil || ev.Sequence != int64(19+i) {
			t.Errorf("line %d = %q (%v), want sequence %d", i, line, err, 19+i)
		}
	}

	model := filepath.Join(t.TempDir(), "best.safetensors")
	out, _, err = fx(t, append([]string{"experiment", "model", "run-1", "--best", "-o", model}, p...)...)
	if err != nil || !strings.Contains(out, "wrote "+model) {
		t.Fatalf("model --best = %q, %v", out, err)
	}
	if m, _, err := tensor.ReadFile(model); err != nil || len(m) == 0 {
		t.Errorf("the downloaded model does not load: %v", err)
	}
	out, _, err = fx(t, append([]string{"experiment", "model", "run-1", "--round", "2", "-o", model + ".2", "--output", "json"}, p...)...)
	var got struct {
		File  string `json:"file"`
		Model struct {
			Round  int    `json:"round"`
			Size   int64  `json:"size"`
			Sha256 string `json:"sha256"`
		} `json:"model"`
	}
	if err != nil || json.Unmarshal([]byte(out), &got) != nil || got.File != model+".2" || got.Model.Round != 2 || got.Model.Size <= 0 || len(got.Model.Sha256) != 64 {
		t.Errorf("model --round 2 --output json = %q, %v", out, err)
	}
	// Completion asks the director for the names.
	out, _, err = fx(t, append([]string{"__complete", "experiment", "status"}, append(p, "ru")...)...)
	if err != nil || !strings.Contains(out, "run-1\tFINISHED") {
		t.Errorf("completing an experiment name: %q, %v", out, err)
	}
	out, _, err = fx(t, append([]string{"experiment", "status", "run-1", "--output", "yaml"}, p...)...)
	var inYAML struct {
		Name   string `yaml:"name"`
		State  string `yaml:"state"`
		Rounds int    `yaml:"rounds"`
	}
	if err != nil || !strings.HasPrefix(out, "---\n") || yaml.Unmarshal([]byte(out), &inYAML) != nil || inYAML.Name != "run-1" || inYAML.State != "FINISHED" || inYAML.Rounds != 2 {
		t.Errorf("status --output yaml = %q, %v (%+v)", out, err, inYAML)
	}
	if _, _, err := fx(t, append([]string{"experiment", "model", "run-1", "--last", "--round", "1"}, p...)...); err == nil || !strings.Contains(err.Error(), "one of") {
		t.Errorf("model --last --round 1: %v", err)
	}
	if _, _, err := fx(t, append([]string{"experiment", "model", "run-1", "--round", "9", "-o", model + ".9"}, p...)...); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Errorf("model --round 9: %v", err)
	}

	if out, _, err := fx(t, append([]string{"experiment", "remove", "run-1"}, p...)...); err != nil || !strings.Contains(out, "removed run-1") {
		t.Errorf("remove = %q, %v", out, err)
	}
	if _, _, err := fx(t, append([]string{"experiment", "status", "run-1"}, p...)...); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Errorf("status after remove: %v", err)
	}
}

// TestExperimentSubmitWaitFailsWhenCancelled: `submit --wait` exits with an
// error naming the state and the reason when the experiment does not
// finish; here it is cancelled while it waits for a third site.
func TestExperimentSubmitWaitFailsWhenCancelled(t *testing.T) {
	f := newResearchFederation(t)
	p := []string{"--profile", f.profile}
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	dir := writePlan(t, "needs-three", 1, 3)
	go func() {
		out, _, err := fx(t, append([]string{"experiment", "submit", dir, "--wait"}, p...)...)
		done <- result{out, err}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, _, err := fx(t, append([]string{"experiment", "cancel", "needs-three", "--reason", "two sites only"}, p...)...)
		if err == nil {
			if !strings.Contains(out, "CANCELLED") {
				t.Errorf("cancel = %q", out)
			}
			break
		}
		if !strings.Contains(err.Error(), "NotFound") || time.Now().After(deadline) {
			t.Fatalf("cancel: %v", err)
		}
	}
	select {
	case r := <-done:
		if r.err == nil || !strings.Contains(r.err.Error(), "CANCELLED") || !strings.Contains(r.err.Error(), "two sites only") {
			t.Errorf("submit --wait = %v, want CANCELLED with the reason\n%s", r.err, r.out)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("submit --wait did not end after the cancellation")
	}
}

// TestExperimentCommandsBadInput: mistakes reach the user as messages that
// name the problem, without hanging.
func TestExperimentCommandsBadInput(t *testing.T) {
	f := newResearchFederation(t)
	p := []string{"--profile", f.profile}
	noPlan := t.TempDir()
	envoyFiles := f.CA.Files(pki.RoleEnvoy, "site-1")
	dead := testfed.FreeAddr(t)

	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		contains []string
	}{
		{"directory without plan.yaml, before connecting", []string{"experiment", "submit", noPlan, "--director", dead, "--timeout", "1m"}, nil, []string{"has no plan.yaml"}},
		{"unknown experiment", append([]string{"experiment", "status", "ghost"}, p...), nil, []string{"ghost", "NotFound"}},
		{"unknown experiment's model", append([]string{"experiment", "model", "ghost", "-o", filepath.Join(noPlan, "m")}, p...), nil, []string{"ghost", "NotFound"}},
		{"envoy certificate", append([]string{"experiment", "list", "--cert", envoyFiles.Cert, "--key", envoyFiles.Key}, p...), nil, []string{"wrong certificate role", "envoy"}},
		{"unreachable director", append([]string{"experiment", "list", "--director", dead, "--timeout", "300ms"}, p...), nil, []string{"cannot reach the director at " + dead}},
		{"unreachable director from the environment", append([]string{"envoys", "list"}, p...), map[string]string{"FX_DIRECTOR": dead, "FX_TIMEOUT": "300ms"}, []string{dead}},
		{"missing profile", []string{"experiment", "list", "--profile", filepath.Join(noPlan, "nope.yaml")}, nil, []string{"nope.yaml", "does not exist"}},
		{"missing profile from FX_PROFILE", []string{"experiment", "list"}, map[string]string{"FX_PROFILE": filepath.Join(noPlan, "gone.yaml")}, []string{"gone.yaml"}},
		{"certificate file missing", append([]string{"experiment", "list", "--cert", filepath.Join(noPlan, "alice.crt")}, p...), nil, []string{"alice.crt", "--cert", "FX_CERT"}},
		{"bad output format", append([]string{"experiment", "list", "--output", "xml"}, p...), nil, []string{"--output", "xml"}},
		{"negative round", append([]string{"experiment", "model", "x", "--round", "-1"}, p...), nil, []string{"--round -1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			start := time.Now()
			_, _, err := fx(t, tt.args...)
			if err == nil {
				t.Fatal("no error")
			}
			t.Log(err)
			if d := time.Since(start); d > 15*time.Second {
				t.Errorf("took %s", d)
			}
			for _, s := range tt.contains {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
		})
	}
}

// TestExperimentProfileSources: the default profile in the user's config
// directory and FX_PROFILE are read; flags beat the environment, which beats
// the profile.
func TestExperimentProfileSources(t *testing.T) {
	f := newResearchFederation(t)
	waitForSites(t, f.profile)
	data, err := os.ReadFile(f.profile)
	if err != nil {
		t.Fatal(err)
	}
	// The default profile, with absolute certificate paths.
	alice := f.CA.Files(pki.RoleResearcher, "alice")
	cfgHome := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", cfgHome)
	if err := os.MkdirAll(filepath.Join(cfgHome, "fx"), 0o700); err != nil {
		t.Fatal(err)
	}
	def := fmt.Sprintf("director: %s\nserver_name: localhost\ncert: %s\nkey: %s\nca: %s\n", f.Addr, alice.Cert, alice.Key, alice.CA)
	if err := os.WriteFile(filepath.Join(cfgHome, "fx", "config.yaml"), []byte(def), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, _, err := fx(t, "envoys", "list"); err != nil || !strings.Contains(out, "site-1") {
		t.Fatalf("with the default profile: %q, %v", out, err)
	}
	dead := testfed.FreeAddr(t)
	t.Setenv("FX_DIRECTOR", dead)
	t.Setenv("FX_TIMEOUT", "300ms")
	if _, _, err := fx(t, "envoys", "list"); err == nil || !strings.Contains(err.Error(), dead) {
		t.Errorf("FX_DIRECTOR over the profile: %v", err)
	}
	if out, _, err := fx(t, "envoys", "list", "--director", f.Addr); err != nil || !strings.Contains(out, "site-1") {
		t.Errorf("--director over FX_DIRECTOR: %q, %v", out, err)
	}
	os.Unsetenv("FX_DIRECTOR")
	// FX_PROFILE names the profile with relative paths.
	t.Setenv("FX_PROFILE", f.profile)
	if out, _, err := fx(t, "envoys", "list"); err != nil || !strings.Contains(out, "site-2") {
		t.Errorf("with FX_PROFILE (%s): %q, %v", data, out, err)
	}
}

func TestExperimentFormatting(t *testing.T) {
	tests := []struct {
		name, got, want string
	}{
		{"bytes", humanBytes(999), "999 B"},
		{"KiB", humanBytes(1536), "1.5 KiB"},
		{"GiB", humanBytes(3 << 30), "3.0 GiB"},
		{"metrics sorted", formatMetrics(map[string]float64{"loss": 0.123456, "accuracy": 0.9}), "accuracy=0.9 loss=0.1235"},
		{"no metrics", formatMetrics(nil), "-"},
		{"shape", formatShape([]int64{28, 28}), "[28,28]"},
		{"scalar shape", formatShape(nil), "[]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.got != tt.want {
				t.Errorf("got %q, want %q", tt.got, tt.want)
			}
		})
	}

	// The bar draws only on a terminal; here it is forced on.
	var buf bytes.Buffer
	bar := &progressBar{w: &buf, label: "uploading x", on: true}
	for _, sent := range []int64{0, 1 << 20, 2 << 20} {
		bar.update(sent, 2<<20)
	}
	bar.done()
	if out := buf.String(); !strings.Contains(out, " 50% 1.0 MiB / 2.0 MiB") || !strings.Contains(out, "100%") || !strings.HasSuffix(out, "\n") {
		t.Errorf("progress bar drew %q", out)
	}
	buf.Reset()
	off := newProgressBar(&buf, "uploading x")
	off.update(1, 2)
	off.done()
	if buf.Len() != 0 {
		t.Errorf("progress bar drew %q on a writer that is not a terminal", buf.String())
	}
}
