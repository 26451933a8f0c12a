package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestVersionStamp: `make build` stamps the version, commit and date into
// fx, and `fx version` shows them.
func TestVersionStamp(t *testing.T) {
	requireE2E(t)
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("no make")
	}
	commit, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Skipf("not a git checkout: %v", err)
	}
	bin := t.TempDir()
	build := exec.Command("make", "-s", "-C", "..", "build", "BIN="+bin, "VERSION=v0.9.1", "DATE=2026-12-06T12:00:00Z")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("make build: %v\n%s", err, out)
	}
	out, err := exec.Command(filepath.Join(bin, "fx"), "version").CombinedOutput()
	want := fmt.Sprintf("fx v0.9.1 (commit %s, dated 2026-12-06T12:00:00Z, go1.", strings.TrimSpace(string(commit))[:12])
	if err != nil || !strings.HasPrefix(string(out), want) {
		t.Fatalf("fx version = %q, %v; want it to start %q", out, err, want)
	}
}
