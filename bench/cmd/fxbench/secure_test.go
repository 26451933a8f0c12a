package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestFederationCPUCountsItsProcesses: cpu sums what /proc says the
// federation's processes spent (here the test's own process, which has
// spent some by now), and a process that is gone counts nothing.
func TestFederationCPUCountsItsProcesses(t *testing.T) {
	self, err := procCPU(os.Getpid())
	if err != nil {
		t.Skipf("no /proc here: %v", err)
	}
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Skipf("cannot run true: %v", err)
	}
	f := &procFederation{procs: []*exec.Cmd{{Process: &os.Process{Pid: os.Getpid()}}, gone}}
	if got := f.cpu(); got < self {
		t.Errorf("cpu() = %v s, less than this process alone had spent before (%v s)", got, self)
	}
}

// TestReportPrivacyShowsCPU: the report gives each trial's CPU and the
// run's CPU ratio next to the round times, and leaves the CPU out for
// results written before it was measured.
func TestReportPrivacyShowsCPU(t *testing.T) {
	dir := t.TempDir()
	r := secureResult{Mode: "dp", Envoys: 10, Rounds: 3, Params: 25_000_000, Goal: 1.1, Ratio: 1.5, CPURatio: 1.25, CPUPerRound: 4.5,
		Trials: []secureTrial{{Order: "plain then dp", Plain: []float64{9, 4, 4}, Secure: []float64{9, 6, 6}, PlainMedian: 4, SecureMedian: 6, Ratio: 1.5, PlainCPU: 40, SecureCPU: 50}}}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "dp.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	reportPrivacy(func(format string, a ...any) { fmt.Fprintf(&out, format, a...) }, dir)
	for _, want := range []string{"1: plain 40.0 s, dp 50.0 s;", "dp costs 1.25× plain's CPU, +4.5 s a round", "**1.50×**"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the report lacks %q:\n%s", want, out.String())
		}
	}
	r.CPURatio, r.Trials[0].PlainCPU, r.Trials[0].SecureCPU = 0, 0, 0
	b, _ = json.Marshal(r)
	if err := os.WriteFile(filepath.Join(dir, "dp.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	reportPrivacy(func(format string, a ...any) { fmt.Fprintf(&out, format, a...) }, dir)
	if strings.Contains(out.String(), "CPU") {
		t.Errorf("a result without CPU figures reports some:\n%s", out.String())
	}
}
