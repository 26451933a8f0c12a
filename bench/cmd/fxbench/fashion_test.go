package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fx-fl/fx/experiment"
)

// TestFashionPlansParse: every algorithm's plan and the DP plan are plans
// fx accepts, so that the benchmark does not fail (or skip FedBuff) after
// its first curves.
func TestFashionPlansParse(t *testing.T) {
	for _, a := range fashionAlgos {
		plan, _ := fashionPlan("t-"+a.Name, 15, 4, a, nil)
		if _, err := experiment.ParsePlan([]byte(plan)); err != nil {
			t.Errorf("%s: %v\n%s", a.Name, err, plan)
		}
		if _, err := parseHyper(a.Hyper); err != nil {
			t.Errorf("%s: %v", a.Name, err)
		}
	}
	plan, differs := fashionPlan("t-dp", 15, 4, fashionAlgos[0], &fashionDP{NoiseMultiplier: 5.5, ClipNorm: 1, Delta: 1e-5})
	p, err := experiment.ParsePlan([]byte(plan))
	if err != nil {
		t.Fatalf("DP plan: %v\n%s", err, plan)
	}
	if p.Privacy.DP == nil || p.Privacy.DP.NoiseMultiplier != 5.5 || !strings.Contains(differs, "noise_multiplier: 5.5") {
		t.Errorf("DP plan lost its noise: %+v, %q", p.Privacy, differs)
	}
}

// TestFashionScore: the best round and the first at the goal; round 0
// (the initial model) never counts.
func TestFashionScore(t *testing.T) {
	c := fashionCurve{Goal: 0.87, Points: []fashionPoint{{Round: 0, Seconds: 0, Accuracy: 0.95}, {Round: 1, Seconds: 1, Accuracy: 0.80}, {Round: 2, Seconds: 2, Accuracy: 0.871}, {Round: 3, Seconds: 3, Accuracy: 0.86}, {Round: 4, Seconds: 4, Accuracy: 0.875}}}
	fashionScore(&c)
	if c.Best != 0.875 || c.BestRound != 4 || c.Reached != 2 {
		t.Errorf("best %v at %d, reached %d; want 0.875 at 4, reached 2", c.Best, c.BestRound, c.Reached)
	}
	c = fashionCurve{Goal: 0.9, Points: c.Points}
	fashionScore(&c)
	if c.Reached != 0 || reachedText(c) != "not reached in 4 rounds" {
		t.Errorf("reached %d (%s); want none", c.Reached, reachedText(c))
	}
}

// TestReportFashion: the section from a fashion.json: a row per curve
// with its best round and goal, the skipped algorithm with its reason,
// and the DP parameters with what the ledgers recorded.
func TestReportFashion(t *testing.T) {
	dir := t.TempDir()
	res := fashionResult{Envoys: 4, Data: "test data", Curves: []fashionCurve{
		{Sharding: "IID", Algorithm: "fedavg", Plan: "aggregation: {algorithm: fedavg}", Goal: 0.88,
			Points: []fashionPoint{{Round: 0, Seconds: 0, Accuracy: 0.1}, {Round: 1, Seconds: 2, Accuracy: 0.85}, {Round: 2, Seconds: 4, Accuracy: 0.881}}},
		{Sharding: "IID", Algorithm: "fedbuff", Skipped: "this fx refuses the plan (aggregation.mode: unknown key)", Goal: 0.88},
		{Sharding: "IID", Algorithm: "fedavg", Plan: "privacy: {dp: {noise_multiplier: 6}}", Goal: 0.88,
			DP:     &fashionDP{NoiseMultiplier: 6, ClipNorm: 1, Delta: 1e-5, Epsilon: 2.99, Budget: "privacy: {budget: {epsilon: 3}}", Spent: []float64{2.99, 2.99}, Charged: []int{2, 2}},
			Points: []fashionPoint{{Round: 0, Seconds: 0, Accuracy: 0.1}, {Round: 1, Seconds: 2, Accuracy: 0.2}, {Round: 2, Seconds: 4, Accuracy: 0.3}}},
	}}
	for i := range res.Curves {
		fashionScore(&res.Curves[i])
	}
	b, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "fashion.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	var w strings.Builder
	reportFashion(func(f string, a ...any) { fmt.Fprintf(&w, f, a...) }, dir)
	got := w.String()
	for _, want := range []string{
		"| IID | fedavg | 0.8810 (2) | ≥ 0.88: **met** | 2 | 4.0 | 0.8500, 0.8810 |",
		"| IID | fedbuff | skipped: this fx refuses the plan (aggregation.mode: unknown key) |",
		"| IID | fedavg + DP (σ 6.00, C 1: ε 2.99 at δ 1e-05) | 0.3000 (2) | ≥ 0.88: not met | none (0.88 not reached) |",
		"the ledgers recorded ε 2.990, 2.990 over [2 2] rounds",
		"[fashion.png](fashion.png)",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("the section lacks %q:\n%s", want, got)
		}
	}
	w.Reset()
	reportFashion(func(f string, a ...any) { fmt.Fprintf(&w, f, a...) }, t.TempDir())
	if !strings.Contains(w.String(), "Not measured") {
		t.Errorf("without fashion.json: %s", w.String())
	}
}

// TestMergeFashion: a later run's curve replaces the one of the same
// sharding and algorithm in place (a DP curve is another), a new one is
// appended, the earlier baseline stays, and the update is recorded.
func TestMergeFashion(t *testing.T) {
	old := &fashionResult{Central: []fashionPoint{{Round: 1, Accuracy: 0.8}}, Curves: []fashionCurve{
		{Sharding: "IID", Algorithm: "fedavg", Best: 0.1},
		{Sharding: "IID", Algorithm: "fedbuff", Skipped: "refused"},
		{Sharding: "IID", Algorithm: "fedavg", DP: &fashionDP{}, Best: 0.2},
	}}
	later := &fashionResult{Uptime: "load average: 1.00, 2.00, 3.00", Curves: []fashionCurve{
		{Sharding: "IID", Algorithm: "fedbuff", Best: 0.88},
		{Sharding: "skew", Algorithm: "fedbuff", Best: 0.87},
	}}
	m := mergeFashion(old, later)
	var got []string
	for _, c := range m.Curves {
		got = append(got, fmt.Sprintf("%s %.2f %s", curveKey(c), c.Best, c.Skipped))
	}
	want := []string{"IID fedavg 0.10 ", "IID fedbuff 0.88 ", "IID fedavg +DP 0.20 ", "skew fedbuff 0.87 "}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("curves %q, want %q", got, want)
	}
	if len(m.Central) != 1 || len(m.Updates) != 1 || strings.Join(m.Updates[0].Curves, ",") != "IID fedbuff,skew fedbuff" {
		t.Errorf("central %v, updates %+v", m.Central, m.Updates)
	}
	if old.Curves[1].Skipped != "refused" {
		t.Error("the earlier result was changed")
	}
}
