package privacy

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// budget3 is the budget of the tests: ε = 3 at δ = 1e-5, σ ≥ 1, C ≤ 2.
var budget3 = Budget{Epsilon: 3, Delta: 1e-5, MinNoise: 1, MaxClip: 2}

// round is one round of site-level DP: the whole update noised once.
func round(experiment string, r int, sigma float64) Charge {
	return Charge{Experiment: experiment, Round: r, SampledGaussian: SampledGaussian{Noise: sigma, Rate: 1, Steps: 1}, Clip: 1, Delta: 1e-5}
}

func openLedger(t *testing.T, path string) *Ledger {
	t.Helper()
	l, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// fitting is how many rounds at σ fit in budget3 from nothing, by the
// accountant directly; the test below depends on it being a handful.
func fitting(t *testing.T, sigma float64) int {
	k, err := MaxSteps(nil, sigma, 1, budget3.Epsilon, budget3.Delta)
	if err != nil || k < 2 || k > 100 {
		t.Fatalf("MaxSteps(σ %v) = %d, %v: want a handful of rounds for this test", sigma, k, err)
	}
	return k
}

func TestLedgerRefusesTheChargeThatExceedsTheBudget(t *testing.T) {
	const sigma = 5
	k := fitting(t, sigma) // 11 rounds at σ = 5
	l := openLedger(t, filepath.Join(t.TempDir(), "privacy.json"))
	for r := 1; r <= k; r++ {
		if err := l.Check("shard-0", budget3, round("exp1", r, sigma)); err != nil {
			t.Fatalf("round %d of %d: Check: %v", r, k, err)
		}
		if _, err := l.Charge("shard-0", budget3, round("exp1", r, sigma)); err != nil {
			t.Fatalf("round %d of %d: Charge: %v", r, k, err)
		}
	}
	spent, err := l.Spent("shard-0", budget3.Delta)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := SampledGaussian{Noise: sigma, Rate: 1, Steps: k}.Epsilon(budget3.Delta)
	if spent != want || spent > budget3.Epsilon {
		t.Errorf("spent %v after %d rounds, want %v ≤ %v", spent, k, want, budget3.Epsilon)
	}
	entries, err := l.Entries("shard-0")
	if err != nil {
		t.Fatal(err)
	}
	if of, err := EpsilonOf(entries, budget3.Delta); err != nil || of != spent {
		t.Errorf("EpsilonOf the entries = %v, %v; want what Spent says, %v", of, err, spent)
	}
	if of, _ := EpsilonOf(entries[:1], budget3.Delta); !(of > 0 && of < spent) {
		t.Errorf("EpsilonOf one entry = %v, want in (0, %v)", of, spent)
	}

	next := round("exp1", k+1, sigma)
	for name, err := range map[string]error{
		"Check":  l.Check("shard-0", budget3, next),
		"Charge": func() error { _, err := l.Charge("shard-0", budget3, next); return err }(),
	} {
		var ex *ExceededError
		if !errors.As(err, &ex) || !errors.Is(err, ErrRefused) {
			t.Fatalf("%s of round %d: %v, want an *ExceededError", name, k+1, err)
		}
		would, _ := SampledGaussian{Noise: sigma, Rate: 1, Steps: k + 1}.Epsilon(budget3.Delta)
		if ex.Would != would || ex.Spent != spent || ex.Fit != 0 || !(ex.MinNoise > sigma) {
			t.Errorf("%s: %+v, want would %v, spent %v, nothing fitting at σ %v, more noise suggested", name, ex, would, spent, sigma)
		}
		for _, part := range []string{"the next round of experiment exp1", `dataset "shard-0"`, "at δ = 1e-05", "above this site's budget of 3", "no round of this experiment fits at noise multiplier 5", "a round at noise multiplier " + ceilDigits(ex.MinNoise) + " or more would"} {
			if !strings.Contains(err.Error(), part) {
				t.Errorf("%s: %q does not say %q", name, err, part)
			}
		}
	}
	if entries, _ := l.Entries("shard-0"); len(entries) != k {
		t.Errorf("%d entries after a refused charge, want %d", len(entries), k)
	}
	// The suggested noise multiplier, as printed, does fit.
	var ex *ExceededError
	errors.As(l.Check("shard-0", budget3, next), &ex)
	louder := next
	louder.Noise, _ = strconv.ParseFloat(ceilDigits(ex.MinNoise), 64)
	if _, err := l.Charge("shard-0", budget3, louder); err != nil {
		t.Errorf("round %d at the suggested σ %v: %v", k+1, louder.Noise, err)
	}
	// A data owner who lowers the budget below what was spent hears that
	// it is used up.
	lower := budget3
	lower.Epsilon = 2
	if err := l.Check("shard-0", lower, round("exp1", k+2, 100)); err == nil || !strings.Contains(err.Error(), "the budget is used up") {
		t.Errorf("a budget below the spending: %v", err)
	}
	// Another dataset has its own budget.
	if _, err := l.Charge("shard-1", budget3, next); err != nil {
		t.Errorf("a fresh dataset refused a round: %v", err)
	}
}

func TestLedgerSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "envoy", "privacy.json")
	l := openLedger(t, path)
	var charged []Entry
	for r, sigma := range []float64{5, 8, 3} {
		e, err := l.Charge("shard-0", budget3, round("exp1", r, sigma))
		if err != nil {
			t.Fatal(err)
		}
		charged = append(charged, e)
	}
	before, _ := l.Spent("shard-0", 1e-6)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Spent("shard-0", 1e-6); err == nil {
		t.Error("a closed ledger answered")
	}

	l = openLedger(t, path)
	entries, err := l.Entries("shard-0")
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(charged) {
		t.Fatalf("%d entries after reopening, want %d", len(entries), len(charged))
	}
	for i := range entries {
		if entries[i] != charged[i] {
			t.Errorf("entry %d is %+v after reopening, was %+v", i, entries[i], charged[i])
		}
	}
	if after, _ := l.Spent("shard-0", 1e-6); after != before {
		t.Errorf("spent %v after reopening, %v before", after, before)
	}
	if ok, _ := l.Charged("shard-0", "exp1", 1); !ok {
		t.Error("Charged misses round 1")
	}
	if ok, _ := l.Charged("shard-0", "exp1", 7); ok {
		t.Error("Charged finds round 7, never charged")
	}
	if names, _ := l.Datasets(); len(names) != 1 || names[0] != "shard-0" {
		t.Errorf("Datasets = %v", names)
	}
}

// TestLedgerComposesHeterogeneousCharges: entries at different σ and q
// compose by adding their RDP curves, then converting once — tighter than
// adding their ε.
func TestLedgerComposesHeterogeneousCharges(t *testing.T) {
	l := openLedger(t, filepath.Join(t.TempDir(), "privacy.json"))
	big := Budget{Epsilon: 100, Delta: 1e-5}
	mechs := []SampledGaussian{{Noise: 2, Rate: 1, Steps: 1}, {Noise: 1.1, Rate: 0.01, Steps: 500}, {Noise: 2, Rate: 1, Steps: 1}}
	total := make([]float64, len(defaultOrders))
	var sumOfEps float64
	for r, m := range mechs {
		if _, err := l.Charge("d", big, Charge{Experiment: "e", Round: r, SampledGaussian: m, Clip: 1}); err != nil {
			t.Fatal(err)
		}
		rdp, _ := m.RDP(defaultOrders)
		for i := range total {
			total[i] += rdp[i]
		}
		e, _ := m.Epsilon(1e-5)
		sumOfEps += e
	}
	want, _, _ := Epsilon(defaultOrders, total, 1e-5)
	got, err := l.Spent("d", 1e-5)
	if err != nil {
		t.Fatal(err)
	}
	if !relClose(got, want, 1e-12) {
		t.Errorf("spent %v, composed RDP gives %v", got, want)
	}
	if got >= sumOfEps {
		t.Errorf("spent %v is not below the sum of the charges' ε, %v", got, sumOfEps)
	}
}

// TestConcurrentChargesAreSerialised: two experiments charge the same
// dataset at once, through one Ledger and through a second one opened on
// the same file (as a second process would, serialised by flock). Exactly
// as many rounds as fit are admitted, whoever wins them.
func TestConcurrentChargesAreSerialised(t *testing.T) {
	const sigma = 5
	k := fitting(t, sigma)
	path := filepath.Join(t.TempDir(), "privacy.json")
	ledgers := []*Ledger{openLedger(t, path), openLedger(t, path)}
	var mu sync.Mutex
	admitted := 0
	var wg sync.WaitGroup
	for w, exp := range []string{"expA", "expB", "expC", "expD"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := ledgers[w%2]
			for r := range 2 * k {
				_, err := l.Charge("shard-0", budget3, round(exp, r, sigma))
				switch {
				case err == nil:
					mu.Lock()
					admitted++
					mu.Unlock()
				case !errors.Is(err, ErrRefused):
					t.Errorf("%s round %d: %v", exp, r, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if admitted != k {
		t.Errorf("%d charges admitted, %d fit", admitted, k)
	}
	entries, err := ledgers[1].Entries("shard-0")
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != k {
		t.Errorf("%d entries recorded, %d fit", len(entries), k)
	}
	if spent, _ := ledgers[0].Spent("shard-0", budget3.Delta); spent > budget3.Epsilon {
		t.Errorf("spent %v, above the budget", spent)
	}
}

func TestReviewAndRemaining(t *testing.T) {
	const sigma = 5
	k := fitting(t, sigma)
	l := openLedger(t, filepath.Join(t.TempDir(), "privacy.json"))
	per := round("exp1", 0, sigma)
	if err := l.Review("shard-0", budget3, per, k); err != nil {
		t.Errorf("a plan of the %d rounds that fit: %v", k, err)
	}
	err := l.Review("shard-0", budget3, per, 50)
	var ex *ExceededError
	if !errors.As(err, &ex) || ex.Fit != k || ex.Rounds != 50 || !(ex.MinNoise > sigma) {
		t.Fatalf("a plan of 50 rounds: %v (%+v), want one saying %d fit and a larger σ", err, ex, k)
	}
	if want := "50 rounds of experiment exp1 would bring"; !strings.Contains(err.Error(), want) {
		t.Errorf("%q does not say %q", err, want)
	}
	if want := fmt.Sprintf("%d rounds of this experiment fit", k); !strings.Contains(err.Error(), want) {
		t.Errorf("%q does not say %q", err, want)
	}
	named := per
	named.Name = "alice/fashion"
	if err := l.Review("shard-0", budget3, named, 50); err == nil || !strings.Contains(err.Error(), "50 rounds of experiment alice/fashion would bring") {
		t.Errorf("a refusal of a named experiment: %v, want it named", err)
	}
	// The suggested σ is enough for all 50, and only just.
	at := per
	at.Noise = ex.MinNoise
	if err := l.Review("shard-0", budget3, at, 50); err != nil {
		t.Errorf("at the suggested σ %v: %v", ex.MinNoise, err)
	}
	at.Noise = ex.MinNoise * 0.999
	if err := l.Review("shard-0", budget3, at, 50); err == nil {
		t.Errorf("σ %v below the suggested %v fits as well", at.Noise, ex.MinNoise)
	}

	for r := range 3 {
		if _, err := l.Charge("shard-0", budget3, round("exp1", r, sigma)); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := l.Remaining("shard-0", budget3, per); err != nil || n != k-3 {
		t.Errorf("Remaining after 3 of %d rounds: %d, %v", k, n, err)
	}
}

func TestBudgetAdmit(t *testing.T) {
	ok := round("e", 1, 1.5)
	for _, c := range []struct {
		name   string
		budget Budget
		charge Charge
		want   string // "" for admitted
	}{
		{"within", budget3, ok, ""},
		{"noise below minimum", budget3, round("e", 1, 0.8), "noise multiplier 0.8 is below this site's minimum of 1"},
		{"clip above maximum", budget3, func() Charge { c := ok; c.Clip = 5; return c }(), "clip norm 5 is above this site's maximum of 2"},
		{"no clip limit", Budget{Epsilon: 3, Delta: 1e-5}, func() Charge { c := ok; c.Clip = 50; return c }(), ""},
		{"no epsilon", Budget{Delta: 1e-5}, ok, "epsilon 0"},
		{"delta 1", Budget{Epsilon: 1, Delta: 1}, ok, "delta 1"},
		{"no experiment", budget3, func() Charge { c := ok; c.Experiment = ""; return c }(), "no experiment named"},
		{"no steps", budget3, func() Charge { c := ok; c.Steps = 0; return c }(), "0 steps"},
		{"rate above 1", budget3, func() Charge { c := ok; c.Rate = 2; return c }(), "sampling rate 2"},
	} {
		err := c.budget.Admit(c.charge)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.want)
		}
	}
	if err := budget3.Admit(round("e", 1, 0.5)); !errors.Is(err, ErrRefused) {
		t.Errorf("a policy refusal does not match ErrRefused: %v", err)
	}
}

// TestTornWriteKeepsEarlierCharges: a write that died before its rename
// leaves a temporary file beside the ledger; the ledger is as it was.
func TestTornWriteKeepsEarlierCharges(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "privacy.json")
	l := openLedger(t, path)
	for r := range 3 {
		if _, err := l.Charge("shard-0", budget3, round("exp1", r, 5)); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	if err := os.WriteFile(filepath.Join(dir, ".privacy.json.tmp-123"), []byte(`{"version": 1, "datasets": {"shard-0": [{"exper`), 0o600); err != nil {
		t.Fatal(err)
	}
	l = openLedger(t, path)
	if entries, err := l.Entries("shard-0"); err != nil || len(entries) != 3 {
		t.Errorf("after a torn write: %d entries, %v; want the 3 charged", len(entries), err)
	}
}

// TestDamagedLedgerRefusesEverything: a ledger that cannot be read admits
// nothing — failing closed — and says what to do.
func TestDamagedLedgerRefusesEverything(t *testing.T) {
	for name, content := range map[string]string{
		"truncated":      `{"version": 1, "datasets": {"shard-0": [{"experiment": "e", "ro`,
		"unknown field":  `{"version": 1, "datasets": {}, "spent": 0}`,
		"negative noise": `{"version": 1, "datasets": {"d": [{"experiment": "e", "round": 1, "noise_multiplier": -1, "sampling_rate": 1, "steps": 1, "clip_norm": 1, "at": "2026-01-01T00:00:00Z"}]}}`,
	} {
		path := filepath.Join(t.TempDir(), "privacy.json")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Open(path)
		if err == nil || !strings.Contains(err.Error(), "is damaged") || !strings.Contains(err.Error(), "restored from a backup") {
			t.Errorf("%s: Open = %v, want a damaged-ledger error", name, err)
		}
	}
	path := filepath.Join(t.TempDir(), "privacy.json")
	if err := os.WriteFile(path, []byte(`{"version": 2, "datasets": {}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "format version 2") {
		t.Errorf("a newer format: %v", err)
	}
}

func TestFreeChargesFitWithoutEnd(t *testing.T) {
	l := openLedger(t, filepath.Join(t.TempDir(), "privacy.json"))
	free := round("e", 1, 2)
	free.Rate = 0
	if n, err := l.Remaining("d", budget3, free); err != nil || n != math.MaxInt {
		t.Errorf("Remaining for charges at rate 0: %d, %v", n, err)
	}
}
