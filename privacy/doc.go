// Package privacy holds the building blocks of client-level differential
// privacy enforced at the site: an RDP accountant for the (Poisson-sampled)
// Gaussian mechanism, ClipAndNoise for a trained model's update, and a
// durable per-dataset Ledger that refuses rounds beyond the data owner's
// Budget. docs/privacy.md explains the mathematics and what ε does and
// does not bound.
//
// It is a top-level package rather than internal/ because the accountant is
// useful beyond the envoy: a researcher's Go program or the experiment
// package can use MinNoise and SampledGaussian.Epsilon to choose σ and the
// number of rounds for a plan, with the very numbers the sites will apply.
//
// How the envoy is meant to use it, per dataset (shard) it serves:
//
//	ledger, err := privacy.Open(filepath.Join(workDir, "privacy.json")) // at start; fail if damaged
//
//	// When an experiment with DP parameters is offered (σ, C, rounds from its plan):
//	per := privacy.Charge{Experiment: id, SampledGaussian: privacy.SampledGaussian{Noise: σ, Rate: 1, Steps: 1}, Clip: C}
//	err = ledger.Review(shard, budget, per, rounds) // decline, or accept knowing ExceededError.Fit
//
//	// Each round, after training and before anything is uploaded:
//	if done, _ := ledger.Charged(shard, id, round); !done {          // a retry of bytes already noised?
//		c := per; c.Round = round
//		if _, err := ledger.Charge(shard, budget, c); err != nil { // durable before release
//			return err // refuse the task: nothing leaves the site
//		}
//		_, err = privacy.ClipAndNoise(global, trained, C, σ)      // then upload trained
//	}
//
// Charge comes first: a crash between charging and uploading over-counts a
// round, never under-counts one. A Check without a Charge admits nothing;
// Remaining and Spent answer "how much is left" for the data owner's CLI.
package privacy
