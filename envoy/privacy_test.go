package envoy

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fx-fl/fx/privacy"
)

// dpPlan is softmaxPlan with rounds and DP parameters.
func dpPlan(name string, rounds int, sigma, clip float64) string {
	plan := strings.Replace(fmt.Sprintf(softmaxPlan, name), "rounds: 2", fmt.Sprintf("rounds: %d", rounds), 1)
	return plan + fmt.Sprintf("privacy: {dp: {noise_multiplier: %v, clip_norm: %v, delta: 1e-5}}\n", sigma, clip)
}

// budget3 is the budget, ε = 3 at δ = 1e-5 (11 rounds at σ = 5),
// with limits on σ and C.
var budget3 = privacy.Budget{Epsilon: 3, Delta: 1e-5, MinNoise: 2, MaxClip: 5}

func TestPrivacySettingsAreChecked(t *testing.T) {
	d := newFakeDirector(t)
	tests := []struct {
		name   string
		mutate func(*Config)
		want   []string
	}{
		{"budget without epsilon", func(c *Config) { c.Privacy.Budget = privacy.Budget{Delta: 1e-5} }, []string{"privacy.budget: epsilon 0"}},
		{"budget with a bad delta", func(c *Config) { c.Privacy.Budget = privacy.Budget{Epsilon: 3, Delta: 2} }, []string{"privacy.budget: delta 2"}},
		{"DP required without a budget", func(c *Config) { c.Privacy.RequireDP = true }, []string{"privacy.require_dp needs privacy.budget"}},
		{"dataset with a slash", func(c *Config) { c.Privacy.Dataset = "a/b" }, []string{"privacy.dataset"}},
		{"damaged ledger", func(c *Config) {
			os.WriteFile(filepath.Join(c.WorkDir, ledgerFile), []byte("{not json"), 0o600)
		}, []string{"privacy ledger", "damaged", "restored from a backup"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, d, "site-a")
			tc.mutate(&cfg)
			_, err := New(cfg)
			if err == nil {
				t.Fatal("New succeeded")
			}
			mustContain(t, "error", err.Error(), tc.want...)
		})
	}
}

// TestPrivacyReviewOfOffers: a site's privacy policy declines, before
// downloading anything, a plan without DP where DP is required, one whose
// σ or C the budget refuses, and one whose rounds do not all fit, each with
// a reason that says what would; it accepts the rest, and their
// collaborators apply the plan's DP, charged to the ledger when the site
// keeps a budget.
func TestPrivacyReviewOfOffers(t *testing.T) {
	d := newFakeDirector(t)
	plain := fmt.Sprintf(softmaxPlan, "plain")
	tests := []struct {
		name     string
		settings PrivacyConfig
		plan     string
		accept   bool
		reason   []string
	}{
		{"no policy, no DP", PrivacyConfig{}, plain, true, nil},
		{"no budget, DP applied unaccounted", PrivacyConfig{}, dpPlan("dp", 3, 1, 1), true, nil},
		{"budget, no DP", PrivacyConfig{Budget: budget3}, plain, true, nil},
		{"DP required", PrivacyConfig{RequireDP: true, Budget: budget3}, plain, false,
			[]string{"this site requires differential privacy", "state privacy.dp in the plan", "noise_multiplier at least 2", "clip_norm at most 5"}},
		{"DP required, many rounds", PrivacyConfig{RequireDP: true, Budget: budget3}, strings.Replace(plain, "rounds: 2", "rounds: 40", 1), false,
			[]string{"noise_multiplier at least", "for 40 rounds", "ε = 3 at δ = 1e-05"}},
		{"noise below the minimum", PrivacyConfig{RequireDP: true, Budget: budget3}, dpPlan("dp", 3, 1.5, 1), false,
			[]string{"privacy budget declines the plan", "noise multiplier 1.5 is below this site's minimum of 2"}},
		{"clip above the maximum", PrivacyConfig{Budget: budget3}, dpPlan("dp", 3, 5, 10), false,
			[]string{"clip norm 10 is above this site's maximum of 5"}},
		{"rounds beyond the budget", PrivacyConfig{RequireDP: true, Budget: budget3}, dpPlan("dp", 20, 5, 1), false,
			[]string{"20 rounds of experiment alice/dp would bring ε", "above this site's budget of 3", "11 rounds of this experiment fit", "at noise multiplier", "all 20 would"}},
		{"fits", PrivacyConfig{RequireDP: true, Budget: budget3, Dataset: "fashion"}, dpPlan("dp", 11, 5, 1), true, nil},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := fmt.Sprintf("site-dp%d", i)
			cfg := testConfig(t, d, name)
			cfg.Privacy = tc.settings
			s := startSite(t, cfg, nil)
			id := fmt.Sprintf("exp-dp%d", i)
			d.push(name, d.offer(id, makeArchive(t, tc.plan, 0), tc.plan), true)
			a := d.answer(name, id)
			if a.GetAccept() != tc.accept {
				t.Fatalf("accept = %v, want %v (reason %q)", a.GetAccept(), tc.accept, a.GetReason())
			}
			mustContain(t, "reason", a.GetReason(), tc.reason...)
			if !tc.accept {
				return
			}
			d.push(name, startAssignment(id), true)
			s.collab.waitFor(t, "the collaborator", func() bool { return s.collab.active[id] })
			s.collab.mu.Lock()
			p := s.collab.starts[0].Privacy
			s.collab.mu.Unlock()
			switch dp := strings.Contains(tc.plan, "privacy:"); {
			case !dp && p != nil:
				t.Errorf("a plan without DP got %+v", p)
			case dp && p == nil:
				t.Fatal("a plan with DP got none")
			case dp && (p.Noise != 5 && p.Noise != 1 || p.Clip != 1 || p.Delta != 1e-5 || p.Name != "alice/dp"):
				t.Errorf("collaborator privacy %+v, want the plan's", p)
			case dp && tc.settings.Budget == (privacy.Budget{}) && p.Ledger != nil:
				t.Error("a site without a budget charges a ledger")
			case dp && tc.settings.Budget != (privacy.Budget{}) && (p.Ledger != s.envoy.ledger || p.Budget != tc.settings.Budget || p.Dataset != "fashion"):
				t.Errorf("collaborator privacy %+v, want the site's ledger, budget and dataset", p)
			}
		})
	}
}

// TestPrivacyReportSurvivesARestart: `fx envoy privacy` (the admin
// command) shows what each experiment spent, what is left and how many
// rounds fit, from the ledger, which a restarted envoy reads back.
func TestPrivacyReportSurvivesARestart(t *testing.T) {
	d := newFakeDirector(t)
	cfg := testConfig(t, d, "site-a")
	cfg.Privacy = PrivacyConfig{RequireDP: true, Budget: budget3}
	// Three rounds of one experiment and one of another, charged by the
	// collaborators of an earlier run.
	l, err := privacy.Open(filepath.Join(cfg.WorkDir, ledgerFile))
	if err != nil {
		t.Fatal(err)
	}
	charge := func(id, name string, round int, sigma float64) {
		c := privacy.Charge{Experiment: id, Name: name, Round: round, SampledGaussian: privacy.SampledGaussian{Noise: sigma, Rate: 1, Steps: 1}, Clip: 1}
		if _, err := l.Charge("site-a", budget3, c); err != nil {
			t.Fatal(err)
		}
	}
	for r := 1; r <= 3; r++ {
		charge("e1", "alice/one", r, 5)
	}
	charge("e2", "bob/two", 4, 10)
	spent, _ := l.Spent("site-a", budget3.Delta)
	probe := privacy.Charge{Experiment: "x", SampledGaussian: privacy.SampledGaussian{Noise: 5, Rate: 1, Steps: 1}, Clip: 1}
	left5, _ := l.Remaining("site-a", budget3, probe)
	l.Close()

	for run := range 2 {
		s := startSite(t, cfg, nil)
		var resp AdminResponse
		eventually(t, "the admin socket to answer", func() bool {
			resp, err = AdminCall(context.Background(), cfg.AdminSocketPath(), AdminRequest{Command: AdminPrivacy})
			return err == nil
		})
		st := resp.Privacy
		if st == nil || !st.RequireDP || st.Budget == nil || *st.Budget != budget3 || st.Delta != 1e-5 || len(st.Datasets) != 1 {
			t.Fatalf("run %d: privacy status %+v", run, st)
		}
		ds := st.Datasets[0]
		if ds.Name != "site-a" || !ds.Current || ds.Spent != spent || ds.Left == nil || *ds.Left != 3-spent {
			t.Errorf("run %d: dataset %+v, want %v spent of 3", run, ds, spent)
		}
		if len(ds.Experiments) != 2 {
			t.Fatalf("run %d: experiments %+v", run, ds.Experiments)
		}
		one, two := ds.Experiments[0], ds.Experiments[1]
		if one.ID != "e1" || one.Name != "alice/one" || one.Rounds != 3 || one.FirstRound != 1 || one.LastRound != 3 || one.Noise != 5 || !(one.Epsilon > 0 && one.Epsilon < spent) {
			t.Errorf("run %d: first experiment %+v", run, one)
		}
		if two.ID != "e2" || two.Rounds != 1 || two.FirstRound != 4 || two.Noise != 10 || !(two.Epsilon < one.Epsilon) {
			t.Errorf("run %d: second experiment %+v", run, two)
		}
		// At the budget's minimum σ (2), at those used (5, 10), and 5, 10.
		var got []string
		for _, r := range ds.RoundsLeft {
			got = append(got, fmt.Sprintf("%v:%d", r.Noise, r.Rounds))
		}
		if len(got) != 3 || got[1] != fmt.Sprintf("5:%d", left5) || ds.RoundsLeft[0].Noise != 2 || ds.RoundsLeft[2].Rounds <= left5 {
			t.Errorf("run %d: rounds left %v, want %d at σ 5 and more at 10", run, got, left5)
		}
		// Asked at σ values of one's own: one below the site's minimum.
		resp, err = AdminCall(context.Background(), cfg.AdminSocketPath(), AdminRequest{Command: AdminPrivacy, Noise: []float64{1, 5}})
		if err != nil {
			t.Fatal(err)
		}
		rl := resp.Privacy.Datasets[0].RoundsLeft
		if len(rl) != 2 || rl[0].Rounds != 0 || !strings.Contains(rl[0].Refused, "below this site's minimum") || rl[1].Rounds != left5 {
			t.Errorf("run %d: rounds left at σ 1 and 5: %+v", run, rl)
		}
		if _, err := AdminCall(context.Background(), cfg.AdminSocketPath(), AdminRequest{Command: AdminPrivacy, Noise: []float64{0}}); err == nil || !strings.Contains(err.Error(), "noise multiplier 0") {
			t.Errorf("run %d: σ 0 asked: %v", run, err)
		}
		s.stop(t)
	}
}
