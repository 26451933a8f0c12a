package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// privacyStatus is what `fx envoy privacy --output json` prints, in part.
type privacyStatus struct {
	RequireDP bool `json:"require_dp"`
	Budget    struct {
		Epsilon float64 `json:"epsilon"`
		Delta   float64 `json:"delta"`
	} `json:"budget"`
	Datasets []struct {
		Name        string  `json:"name"`
		Current     bool    `json:"current"`
		Spent       float64 `json:"epsilon_spent"`
		Experiments []struct {
			Name      string  `json:"name"`
			Rounds    int     `json:"rounds"`
			LastRound int     `json:"last_round"`
			Noise     float64 `json:"noise_multiplier"`
			Epsilon   float64 `json:"epsilon"`
		} `json:"experiments"`
		RoundsLeft []struct {
			Noise  float64 `json:"noise_multiplier"`
			Rounds int     `json:"rounds"`
		} `json:"rounds_left"`
	} `json:"datasets"`
}

// TestDifferentialPrivacyBudget: two sites each require DP and keep a
// budget of ε = 3 at δ = 1e-5 (set through FX_PRIVACY_* variables). An
// experiment with DP that fits runs and finishes, and each site's ledger
// (`fx envoy privacy`) shows its rounds; the ledger survives a restart of
// the envoy; then an experiment whose rounds no longer fit what is left,
// and one without DP, are declined at the offer, and the researcher reads
// each site's reason — how many rounds fit — in the experiment's status.
func TestDifferentialPrivacyBudget(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	f.startDirector(directorOptions{})
	budget := envoyOptions{env: []string{"FX_PRIVACY_REQUIRE_DP=true", "FX_PRIVACY_BUDGET_EPSILON=3", "FX_PRIVACY_BUDGET_DELTA=1e-5", "FX_PRIVACY_BUDGET_MIN_NOISE_MULTIPLIER=2"}}
	shards := map[string]shard{"site-1": syntheticShard(1, 2, ""), "site-2": syntheticShard(2, 2, "")}
	for _, name := range []string{"site-1", "site-2"} {
		f.startEnvoyOpts(name, shards[name], budget)
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, "site-1", "site-2")

	// σ = 5 spends ε ≈ 1.45 in 3 rounds; 11 rounds fit in ε = 3. A small
	// clip norm keeps the noise (σC per element) from swamping the model.
	dp := "privacy: {dp: {noise_multiplier: 5, clip_norm: 0.01, delta: 1e-5}}\n"
	f.submit("alice", writePlan(t, syntheticPlan("dp-fits", 3, "", "")+dp))
	e := f.waitState(c, "dp-fits", 3*time.Minute, fxv1.ExperimentState_FINISHED)
	checkEndedParticipants(t, e)

	ledger := func(site string) privacyStatus {
		t.Helper()
		r := f.runFx("envoy", "privacy", "--config", f.envoyConfigs[site], "--output", "json")
		if r.err != nil {
			t.Fatalf("fx envoy privacy at %s: %v\n%s", site, r.err, r.stderr)
		}
		var st privacyStatus
		if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
			t.Fatalf("fx envoy privacy --output json at %s: %v\n%s", site, err, r.stdout)
		}
		return st
	}
	var spent float64
	for _, site := range []string{"site-1", "site-2"} {
		st := ledger(site)
		if !st.RequireDP || st.Budget.Epsilon != 3 || st.Budget.Delta != 1e-5 || len(st.Datasets) != 1 {
			t.Fatalf("%s: privacy status %+v", site, st)
		}
		ds := st.Datasets[0]
		if ds.Name != site || !ds.Current || len(ds.Experiments) != 1 {
			t.Fatalf("%s: dataset %+v, want one experiment charged to %s", site, ds, site)
		}
		x := ds.Experiments[0]
		if x.Name != "alice/dp-fits" || x.Rounds != 3 || x.LastRound != 3 || x.Noise != 5 || !(ds.Spent > 1 && ds.Spent < 1.5) || x.Epsilon != ds.Spent {
			t.Errorf("%s: ledger %+v, want 3 rounds of alice/dp-fits at σ 5, ε ≈ 1.45", site, ds)
		}
		spent = ds.Spent
	}
	if r := f.runFx("envoy", "privacy", "--config", f.envoyConfigs["site-1"]); r.err != nil || !strings.Contains(r.stdout, "alice/dp-fits") || !strings.Contains(r.stdout, "3 (1–3)") {
		t.Errorf("fx envoy privacy (table): %v\n%s", r.err, r.stdout)
	}

	// The ledger survives a restart of the envoy on the same work
	// directory.
	f.envoys["site-1"].stop(t)
	f.startEnvoyOpts("site-1", shards["site-1"], budget)
	f.waitEnvoysOnline(c, "site-1", "site-2")
	var after privacyStatus
	f.waitFor(30*time.Second, "site-1's admin socket", func() (bool, error) {
		r := f.runFx("envoy", "privacy", "--config", f.envoyConfigs["site-1"], "--output", "json")
		if r.err != nil {
			return false, fmt.Errorf("%v: %s", r.err, r.stderr)
		}
		return true, json.Unmarshal([]byte(r.stdout), &after)
	})
	if len(after.Datasets) != 1 || after.Datasets[0].Spent != spent || len(after.Datasets[0].Experiments) != 1 || after.Datasets[0].Experiments[0].Rounds != 3 {
		t.Fatalf("site-1's ledger after a restart: %+v, want the 3 rounds and ε %v", after, spent)
	}
	fit := -1
	for _, r := range after.Datasets[0].RoundsLeft {
		if r.Noise == 5 {
			fit = r.Rounds
		}
	}
	if fit != 8 {
		t.Fatalf("rounds left at σ 5 after 3 of 11: %d, want 8 (%+v)", fit, after.Datasets[0].RoundsLeft)
	}

	// 10 more rounds at σ = 5 do not fit what is left: both sites decline,
	// saying 8 would, and the experiment fails with their reasons.
	f.submit("alice", writePlan(t, syntheticPlan("dp-too-long", 10, "", "")+dp))
	e = f.waitState(c, "dp-too-long", time.Minute, fxv1.ExperimentState_FAILED)
	for _, site := range []string{"site-1", "site-2"} {
		p := participant(e, site)
		t.Logf("dp-too-long: %s %s: %s", site, p.GetState(), p.GetReason())
		for _, want := range []string{"privacy budget declines the plan", "10 rounds of experiment alice/dp-too-long would bring ε", "above this site's budget of 3", "8 rounds of this experiment fit", "all 10 would"} {
			if p.GetState() != fxv1.ParticipantState_DECLINED || !strings.Contains(p.GetReason(), want) {
				t.Errorf("%s on dp-too-long: %s %q, want DECLINED saying %q", site, p.GetState(), p.GetReason(), want)
			}
		}
	}
	if out := f.mustExp("alice", "status", "dp-too-long"); !strings.Contains(out, "8 rounds of this experiment fit") {
		t.Errorf("fx experiment status does not show the sites' reason:\n%s", out)
	}

	// A plan without DP is declined, saying what the sites accept.
	f.submit("alice", writePlan(t, syntheticPlan("no-dp", 2, "", "")))
	e = f.waitState(c, "no-dp", time.Minute, fxv1.ExperimentState_FAILED)
	if p := participant(e, "site-2"); !strings.Contains(p.GetReason(), "requires differential privacy") || !strings.Contains(p.GetReason(), "noise_multiplier at least 2") {
		t.Errorf("site-2 on a plan without DP: %s %q", p.GetState(), p.GetReason())
	}

	// Nothing was charged for the declined experiments.
	if st := ledger("site-2"); st.Datasets[0].Spent != spent {
		t.Errorf("site-2 spent %v after the declined offers, want %v", st.Datasets[0].Spent, spent)
	}
}
