package app

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/envoy"
	"github.com/fx-fl/fx/pki"
)

// An experiment directory whose code a reviewer reads: a plan selecting
// the given tag, a script, an executable launcher.
func reviewedExperiment(t *testing.T, name, tag string) (dir string, files map[string]string) {
	t.Helper()
	dir = t.TempDir()
	files = map[string]string{
		"plan.yaml":    "name: " + name + "\nrounds: 1\nparticipants: {min: 1, tags: [" + tag + "]}\nrunner: {kind: builtin, model: softmax}\n",
		"train.py":     "import os\nprint(os.environ)\n",
		"bin/run.sh":   "#!/bin/sh\nexec python3 train.py\n",
		"data/note.md": "nothing to see\n",
	}
	for name, body := range files {
		mode := os.FileMode(0o600)
		if strings.HasSuffix(name, ".sh") {
			mode = 0o700
		}
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(name)), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), mode); err != nil {
			t.Fatal(err)
		}
	}
	return dir, files
}

// checkReview checks what fx ... inspect printed and unpacked.
func checkReview(t *testing.T, out, extracted string, files map[string]string) {
	t.Helper()
	for name, body := range files {
		sum := sha256.Sum256([]byte(body))
		if !strings.Contains(out, hex.EncodeToString(sum[:])+"  "+name) {
			t.Errorf("the listing lacks %s with its sha256:\n%s", name, out)
		}
		got, err := os.ReadFile(filepath.Join(extracted, name))
		if err != nil || string(got) != body {
			t.Errorf("extracted %s: %q, %v", name, got, err)
		}
	}
	for _, want := range []string{"(verified)", "  participants: {min: 1", "bin/run.sh  (executable)", "4 files"} {
		if !strings.Contains(out, want) {
			t.Errorf("the listing lacks %q:\n%s", want, out)
		}
	}
}

// The admin reads a pending experiment's code: plan, files with sizes and
// digests, unpacked safely for reading; only an admin may; an archive that
// does not match the recorded digest is reported, not shown.
func TestDirectorInspect(t *testing.T) {
	f := newResearchFederation(t)
	f.Settings.ReviewPolicy = "manual"
	f.RestartDirector()
	dir, files := reviewedExperiment(t, "study", "nowhere")
	if out, _, err := fx(t, "experiment", "submit", dir, "--profile", f.profile); err != nil {
		t.Fatalf("submit: %v\n%s", err, out)
	}
	as := func(role pki.Role, name string) []string {
		c := f.CA.Files(role, name)
		return []string{"--director", f.Addr, "--server-name", "localhost", "--tls-cert", c.Cert, "--tls-key", c.Key, "--tls-ca", c.CA}
	}
	admin := as(pki.RoleAdmin, "root")

	extracted := filepath.Join(t.TempDir(), "code")
	out, _, err := fx(t, append([]string{"director", "inspect", "study", "--owner", "alice", "--extract", extracted}, admin...)...)
	if err != nil {
		t.Fatalf("director inspect: %v\n%s", err, out)
	}
	checkReview(t, out, extracted, files)
	t.Logf("fx director inspect printed:\n%s", out)
	if !strings.Contains(out, "experiment study of alice") || !strings.Contains(out, "PENDING") || !strings.Contains(out, "fx director approve alice/study") {
		t.Errorf("director inspect printed:\n%s", out)
	}

	if _, _, err := fx(t, append([]string{"director", "inspect", "study", "--owner", "alice", "--extract", extracted}, admin...)...); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Errorf("extracting into a directory that holds files: %v, want a refusal", err)
	}
	if _, _, err := fx(t, append([]string{"director", "inspect", "study", "--owner", "alice"}, as(pki.RoleResearcher, "alice")...)...); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Errorf("director inspect as a researcher: %v, want PermissionDenied", err)
	}
	if _, _, err := fx(t, append([]string{"director", "inspect", "nothing", "--owner", "alice"}, admin...)...); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Errorf("director inspect of an unknown experiment: %v", err)
	}

	// Whatever the director serves is checked against what it recorded.
	archives, err := filepath.Glob(filepath.Join(f.Root, "director", "experiments", "*", "archive"))
	if err != nil || len(archives) != 1 {
		t.Fatalf("the director's archives: %v, %v", archives, err)
	}
	data, err := os.ReadFile(archives[0])
	if err != nil {
		t.Fatal(err)
	}
	data[len(data)/2] ^= 0xff
	if err := os.WriteFile(archives[0], data, 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err = fx(t, append([]string{"director", "inspect", "study", "--owner", "alice"}, admin...)...)
	if err == nil || !strings.Contains(err.Error(), "do not approve it") || strings.Contains(out, "train.py") {
		t.Errorf("inspect of an archive that does not match its digest: %v\n%s", err, out)
	}
}

// The data owner reads the code of an offer pending at its envoy, through
// the envoy's admin socket.
func TestEnvoyInspect(t *testing.T) {
	f := newResearchFederation(t)
	// A third site, whose owner reviews offers by hand.
	files := f.CA.Files(pki.RoleEnvoy, "site-3")
	work, err := os.MkdirTemp("", "fx-inspect-") // short: the socket path must fit
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	cfgFile := writeEnvoyConfig(t, "name: site-3\ndirector: {address: \""+f.Addr+"\", server_name: localhost}\n"+
		"tls: {cert: "+files.Cert+", key: "+files.Key+", ca: "+files.CA+"}\n"+
		"work_dir: "+work+"\ntags: [hand-reviewed]\nreview: {policy: manual}\n"+
		"shard: {kind: synthetic, features: 8, classes: 3, train_samples: 60, valid_samples: 12}\n")
	cfg, err := loadEnvoyConfig(cfgFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RunCollaborator = parkedCollaborator
	startEnvoy(t, cfg, false)

	dir, contents := reviewedExperiment(t, "study", "hand-reviewed")
	if out, _, err := fx(t, "experiment", "submit", dir, "--profile", f.profile); err != nil {
		t.Fatalf("submit: %v\n%s", err, out)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := run(t, "envoy", "pending", "--config", cfgFile, "--json")
		var pending []envoy.PendingOffer
		if err == nil && json.Unmarshal([]byte(out), &pending) == nil && len(pending) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no offer pending at site-3: %q, %v", out, err)
		}
		time.Sleep(20 * time.Millisecond) // the offer reaches the envoy asynchronously: poll its socket until the deadline
	}

	extracted := filepath.Join(t.TempDir(), "code")
	out, err := run(t, "envoy", "inspect", "alice/study", "--config", cfgFile, "--extract", extracted)
	if err != nil {
		t.Fatalf("envoy inspect: %v\n%s", err, out)
	}
	checkReview(t, out, extracted, contents)
	if !strings.Contains(out, "offer study of alice") || !strings.Contains(out, "fx envoy approve alice/study") {
		t.Errorf("envoy inspect printed:\n%s", out)
	}
	if _, err := run(t, "envoy", "inspect", "other", "--config", cfgFile); err == nil || !strings.Contains(err.Error(), "no pending offer is called") {
		t.Errorf("envoy inspect of an unknown offer: %v", err)
	}
	// Once decided, the offer is not pending any more.
	if _, err := run(t, "envoy", "reject", "study", "--config", cfgFile, "--reason", "reads the environment"); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, "envoy", "inspect", "study", "--config", cfgFile); err == nil {
		t.Error("envoy inspect of a decided offer succeeded")
	}
}
