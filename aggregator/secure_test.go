package aggregator_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
	"github.com/fx-fl/fx/privacy"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/secagg"
)

// secureCollab runs a collaborator that takes part in the plan's secure
// aggregation.
func (f *federation) secureCollab(ctx context.Context, name string, r runner.Runner) <-chan error {
	f.t.Helper()
	return f.secureCollabDP(ctx, name, r, nil)
}

// secureCollabDP is secureCollab with differential privacy at the site:
// dp, if set, clips and noises the update before it is masked.
func (f *federation) secureCollabDP(ctx context.Context, name string, r runner.Runner, dp *collaborator.Privacy) <-chan error {
	f.t.Helper()
	k := f.ca.Keyring(pki.RoleEnvoy, name)
	c, err := collaborator.New(collaborator.Config{
		ExperimentID: experimentID,
		Name:         name,
		Address:      f.addr,
		DialOptions:  testpki.DialOptions(k, "localhost"),
		Runner:       r,
		WorkDir:      f.t.TempDir(),
		Logger:       testLogger(f.t, name),
		Secure: &collaborator.Secure{
			Threshold:    f.plan.SecureThresholdOrDefault(),
			Range:        f.plan.SecureRangeOrDefault(),
			EqualWeights: f.plan.Aggregation.Weights == experiment.WeightsEqual,
		},
		Privacy: dp,
	})
	if err != nil {
		f.t.Fatalf("collaborator.New: %v", err)
	}
	out := make(chan error, 1)
	go func() { out <- c.Run(ctx) }()
	return out
}

// secureTolerance is how far a secure round's weight may be from the exact
// FedAvg: the fixed-point error, n·2^-(f+1) with f = 30 − ⌈log2 R⌉, plus
// one float32 rounding of the value.
func secureTolerance(n int, r, v float64) float64 {
	f := 30 - math.Ceil(math.Log2(r))
	return float64(n)*math.Pow(2, -(f+1)) + math.Abs(v)*0x1p-23
}

// A secure experiment's models are the plain FedAvg's within the fixed
// point's precision, round after round, with a server optimiser too.
func TestSecureEqualsFedAvg(t *testing.T) {
	for _, alg := range []string{"fedavg", "fedadam"} {
		t.Run(alg, func(t *testing.T) {
			plain := "name: test\nrounds: 2\nparticipants: {min: 3}\nrunner: {kind: builtin, model: mlp}\n" +
				"stragglers: {deadline: 30s, min_reporting: 3}\naggregation: {algorithm: " + alg + ", lr: 0.1}\n"
			secure := strings.Replace(plain, "lr: 0.1}", "lr: 0.1, secure: true, secure_range: 2}", 1)
			runners := func() []*stepRunner {
				return []*stepRunner{{Step: 0.25, Samples: 1}, {Step: -0.5, Samples: 3}, {Step: 1.125, Samples: 2}}
			}
			ref := newFederation(t, parsePlan(t, plain), "alpha", "beta", "gamma")
			ref.start()
			ref.runToEnd(t.Context(), runners())

			f := newFederation(t, parsePlan(t, secure), "alpha", "beta", "gamma")
			f.start()
			var results []<-chan error
			for i, r := range runners() {
				results = append(results, f.secureCollab(t.Context(), f.parts[i], r))
			}
			if err := f.wait(60 * time.Second); err != nil {
				t.Fatalf("Run: %v", err)
			}
			for i, res := range results {
				if err := <-res; !finished(err) {
					t.Errorf("collaborator %s: %v, want quit", f.parts[i], err)
				}
			}
			for round := 1; round <= 2; round++ {
				want, got := readModel(t, ref.dir, round), readModel(t, f.dir, round)
				for _, name := range []string{"fc.weight", "fc.bias"} {
					w, g := values(want, name), values(got, name)
					for i := range w {
						if d := math.Abs(float64(g[i] - w[i])); d > float64(round)*secureTolerance(3, 2, float64(w[i])) {
							t.Errorf("round %d %s[%d] = %v, plain FedAvg %v (off by %g)", round, name, i, g[i], w[i], d)
						}
					}
				}
			}
			if sums := f.sink.summaries(); len(sums) < 2 || len(sums[0].Reported) != 3 {
				t.Fatalf("summaries %+v, want every site reported in round 1", sums)
			}
		})
	}
}

// A site that takes part in the key exchange and then dies before it
// uploads: the round closes with the survivors' correct mean (the dead
// site's pairwise masks removed with the shares of its mask key that the
// survivors reveal), and the next round goes on without it once its key
// advertisement step times out.
func TestSecureSurvivesADroppedSite(t *testing.T) {
	plan := parsePlan(t, `
name: test
rounds: 2
participants: {min: 3}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 8s, min_reporting: 2, percent: 0.6}
aggregation: {secure: true, secure_threshold: 2}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation, metric: accuracy, mode: max}
`)
	f := newFederation(t, plan, "alpha", "beta", "gamma")
	f.start()
	ctx := t.Context()

	// gamma advertises and shares its keys in round 1, by hand, and then
	// is gone.
	gammaDone := make(chan error, 1)
	go func() { gammaDone <- f.exchangeKeysThenDie(ctx, "gamma", 1, 5) }()

	a := f.secureCollab(ctx, "alpha", &stepRunner{Step: 0.5, Samples: 1})
	b := f.secureCollab(ctx, "beta", &stepRunner{Step: -1, Samples: 3})
	if err := <-gammaDone; err != nil {
		t.Fatalf("gamma: %v", err)
	}
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, res := range []<-chan error{a, b} {
		if err := <-res; !finished(err) {
			t.Errorf("collaborator: %v, want quit", err)
		}
	}
	// Each round: (1·0.5 + 3·(−1)) / 4 = −0.625 from the survivors alone.
	for round := 1; round <= 2; round++ {
		got := values(readModel(t, f.dir, round), "fc.weight")
		for i, v := range []float32{1, 2, 3, 4, 5, 6} {
			want := float64(v) - 0.625*float64(round)
			if d := math.Abs(float64(got[i]) - want); d > float64(round)*secureTolerance(2, experiment.DefaultSecureRange, want) {
				t.Errorf("round %d fc.weight[%d] = %v, want %v", round, i, got[i], want)
			}
		}
	}
	sums := f.sink.summaries()
	if len(sums) != 2 {
		t.Fatalf("%d summaries, want 2", len(sums))
	}
	for _, s := range sums {
		if strings.Join(s.Reported, ",") != "alpha,beta" || strings.Join(s.Missing, ",") != "gamma" {
			t.Errorf("round %d reported %v missing %v, want alpha and beta, gamma missing", s.Round, s.Reported, s.Missing)
		}
	}
}

// exchangeKeysThenDie is a participant that advertises its keys and sends
// its shares in round, through the aggregator, and then stops calling.
func (f *federation) exchangeKeysThenDie(ctx context.Context, name string, round int, weight float64) error {
	k := f.ca.Keyring(pki.RoleEnvoy, name)
	conn, err := grpc.NewClient(f.addr, testpki.DialOptions(k, "localhost")...)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := fxv1.NewAggregatorClient(conn)
	p, err := secagg.NewParticipant(secagg.ParticipantConfig{
		Session: secagg.Session{Experiment: experimentID, Round: uint64(round)}, ID: name,
		Threshold: f.plan.SecureThresholdOrDefault(), Range: f.plan.SecureRangeOrDefault(), Weight: weight,
	})
	if err != nil {
		return err
	}
	step := func(s fxv1.SecureAggregationRequest_Step, msg []byte) ([]byte, error) {
		for {
			resp, err := client.SecureAggregation(ctx, &fxv1.SecureAggregationRequest{
				ExperimentId: experimentID, Collaborator: name, Round: int32(round), Step: s, Message: msg})
			if err != nil || resp.GetReady() {
				return resp.GetMessage(), err
			}
		}
	}
	adv, _ := p.Advertise()
	msg, _ := adv.MarshalBinary()
	answer, err := step(fxv1.SecureAggregationRequest_ADVERTISE, msg)
	if err != nil {
		return err
	}
	var keys secagg.KeyList
	if err := keys.UnmarshalBinary(answer); err != nil {
		return err
	}
	shares, err := p.ShareKeys(&keys)
	if err != nil {
		return err
	}
	msg, _ = shares.MarshalBinary()
	_, err = step(fxv1.SecureAggregationRequest_SHARE_KEYS, msg)
	return err
}

// validateGate holds the local validation of one round until its gate
// closes.
type validateGate struct {
	stepRunner
	gate  chan struct{}
	round int
}

func (g *validateGate) Validate(ctx context.Context, task runnerTask, m modelT) (runnerResult, error) {
	if task.Round == g.round && task.Name == runner.TaskLocalValidation {
		select {
		case <-g.gate:
		case <-ctx.Done():
			return runnerResult{}, ctx.Err()
		}
	}
	return g.stepRunner.Validate(ctx, task, m)
}

// The aggregator stops (its director restarts) in round 2 of a secure
// experiment, after both sites exchanged keys and uploaded their masked
// updates there and before the round closed. The restarted aggregator
// knows none of the round's keys: it hands round 2 out again, the sites
// exchange fresh keys for the updates they kept and upload them masked
// again, and the round's model is the mean of both.
func TestSecureRoundResumedAfterRestart(t *testing.T) {
	plan := parsePlan(t, `
name: test
rounds: 2
participants: {min: 2}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 30s, min_reporting: 2}
aggregation: {secure: true}
`)
	f := newFederation(t, plan, "alpha", "beta")
	f.start()
	ctx := t.Context()
	gate := make(chan struct{})
	alphaRunner := &stepRunner{Step: 1, Samples: 1}
	beta := &validateGate{stepRunner: stepRunner{Step: 3, Samples: 1}, gate: gate, round: 2}
	a := f.secureCollab(ctx, "alpha", alphaRunner)
	b := f.secureCollab(ctx, "beta", beta)
	f.sink.waitProgress(t, "alpha", 2, 20*time.Second)
	if err := f.stop(); err == nil {
		t.Fatal("a cancelled aggregator returned nil")
	}
	f.sink = newSink()
	f.start()
	close(gate)
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("resumed Run: %v", err)
	}
	for name, done := range map[string]<-chan error{"alpha": a, "beta": b} {
		if err := <-done; !finished(err) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if n := countTasks(alphaRunner, runner.TaskTrain, 2); n != 1 {
		t.Errorf("alpha trained round 2 %d times, want once: the kept update is sent again", n)
	}
	sums := f.sink.summaries()
	if len(sums) == 0 || sums[0].Round != 2 || strings.Join(sums[0].Reported, ",") != "alpha,beta" {
		t.Fatalf("the resumed round 2: %+v, want both updates", sums)
	}
	// Each round moves every weight by (1 + 3) / 2.
	got := values(readModel(t, f.dir, 2), "fc.bias")
	for i, v := range got {
		if d := math.Abs(float64(v) - 4); d > 2*secureTolerance(2, experiment.DefaultSecureRange, 4) {
			t.Errorf("round 2 bias[%d] = %v, want 4", i, v)
		}
	}
}

// A site that trains slowly in round 1 misses the key advertisement, which
// closes without it once t sites advertised and half the time to the
// deadline passed: it sits the round out — asked for nothing more in it,
// not spinning on refused calls — and the round closes at its deadline with
// the two others' mean; in round 2 it takes part again.
func TestSecureSlowSiteSitsOut(t *testing.T) {
	plan := parsePlan(t, `
name: test
rounds: 2
participants: {min: 3}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 6s, min_reporting: 2}
aggregation: {secure: true, secure_threshold: 2}
`)
	f := newFederation(t, plan, "alpha", "beta", "gamma")
	var mu sync.Mutex
	advertised := map[string]int{} // gamma's ADVERTISE calls, by round
	f.serverOptions = []grpc.ServerOption{grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if r, ok := req.(*fxv1.SecureAggregationRequest); ok && r.GetCollaborator() == "gamma" && r.GetStep() == fxv1.SecureAggregationRequest_ADVERTISE {
			mu.Lock()
			advertised[fmt.Sprint(r.GetRound())]++
			mu.Unlock()
		}
		return h(ctx, req)
	})}
	f.start()
	ctx := t.Context()
	gate := make(chan struct{})
	a := f.secureCollab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1})
	b := f.secureCollab(ctx, "beta", &stepRunner{Step: 3, Samples: 1})
	g := f.secureCollab(ctx, "gamma", &gatedRunner{stepRunner: stepRunner{Step: 2, Samples: 2}, gate: gate, gateRound: 1})
	// alpha's train is counted only after the key exchange closed, and it
	// closed without gamma, whose training is held until then.
	waitFor(t, 20*time.Second, "alpha's round-1 update", func() bool {
		f.sink.mu.Lock()
		defer f.sink.mu.Unlock()
		for _, p := range f.sink.progress {
			if p.Collaborator == "alpha" && p.Round == 1 && (p.Task == runner.TaskLocalValidation || p.LastRound >= 1) {
				return true
			}
		}
		return false
	})
	close(gate)
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for name, done := range map[string]<-chan error{"alpha": a, "beta": b, "gamma": g} {
		if err := <-done; !finished(err) {
			t.Errorf("%s: %v", name, err)
		}
	}
	mu.Lock()
	if advertised["1"] != 1 || advertised["2"] != 1 {
		t.Errorf("gamma's key advertisements by round: %v, want one in each", advertised)
	}
	mu.Unlock()
	sums := f.sink.summaries()
	if len(sums) < 2 || strings.Join(sums[0].Reported, ",") != "alpha,beta" || strings.Join(sums[1].Reported, ",") != "alpha,beta,gamma" {
		t.Fatalf("summaries %+v, want alpha and beta in round 1, everyone in round 2", sums)
	}
	// Round 1: (1 + 3) / 2 = 2; round 2: (1 + 3 + 2·2) / 4 = 2 more.
	// (Steps stay within the range R = 4, beyond which they are clipped.)
	for round, want := range map[int]float64{1: 2, 2: 4} {
		for i, v := range values(readModel(t, f.dir, round), "fc.bias") {
			if d := math.Abs(float64(v) - want); d > 2*secureTolerance(3, experiment.DefaultSecureRange, want) {
				t.Errorf("round %d bias[%d] = %v, want %v", round, i, v, want)
			}
		}
	}
}

// waitFor waits until cond holds, failing the test after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not happen within %s", what, timeout)
		}
		<-time.After(10 * time.Millisecond)
	}
}

// A secure aggregator allocates no plain accumulator, so it has no spool
// directory for one's stages, and it reserves for the process's memory
// limit what it holds: the global model P, the round's secure sum (4 bytes
// an element) and its masked uploads staged in memory, at most StageBudget
// and at most one per participant: P + 4E + min(StageBudget(P), N·4E).
func TestSecureMemoryNeed(t *testing.T) {
	if _, ok := os.LookupEnv("GOMEMLIMIT"); ok {
		t.Skip("GOMEMLIMIT is set: the aggregator leaves the memory limit alone")
	}
	const plan = "name: test\nrounds: 1\nparticipants: {min: 3}\nrunner: {kind: builtin, model: mlp}\n" +
		"stragglers: {deadline: 30s}\naggregation: {algorithm: fedavg"
	limit := func() int64 { return debug.SetMemoryLimit(-1) }
	// A plain aggregator runs first, so that the process's reservation is
	// not zero when the secure one reserves: its reservation then adds to
	// the limit exactly.
	plain := newFederation(t, parsePlan(t, plan+"}\n"), "alpha", "beta", "gamma")
	before := limit()
	plain.start()
	waitFor(t, 10*time.Second, "the plain aggregator's reservation", func() bool { return limit() != before })
	if _, err := os.Stat(filepath.Join(plain.dir, "spool")); err != nil {
		t.Fatalf("the plain aggregator's spool: %v", err)
	}
	withPlain := limit()

	f := newFederation(t, parsePlan(t, plan+", secure: true}\n"), "alpha", "beta", "gamma")
	f.start()
	waitFor(t, 10*time.Second, "the secure aggregator's reservation", func() bool { return limit() != withPlain })
	p := f.initial.Bytes()
	var elems int64
	for _, x := range f.initial {
		elems += x.Elements()
	}
	sum := 4 * elems
	want := p + sum + min(aggregator.StageBudget(p), 3*sum)
	if got := limit() - withPlain; got != want {
		t.Errorf("the secure aggregator reserved %d bytes, want %d: the model %d, the secure sum %d, three masked uploads staged %d", got, want, p, sum, 3*sum)
	}
	if _, err := os.Stat(filepath.Join(f.dir, "spool")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the secure aggregator's directory has a spool for a plain accumulator's stages (%v): it allocated one", err)
	}
}

// tamperBundleTo is a server option that corrupts one byte of the first
// sealed share in the share bundle the aggregator relays to site to, as
// an aggregator or a relay that alters a share on the way would. It
// reports the share's sender on from.
func tamperBundleTo(t *testing.T, to string, from chan<- string) grpc.ServerOption {
	return grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		resp, err := h(ctx, req)
		r, ok := req.(*fxv1.SecureAggregationRequest)
		if !ok || err != nil || r.GetCollaborator() != to || r.GetStep() != fxv1.SecureAggregationRequest_SHARE_KEYS || !resp.(*fxv1.SecureAggregationResponse).GetReady() {
			return resp, err
		}
		var b secagg.ShareBundle
		if err := b.UnmarshalBinary(resp.(*fxv1.SecureAggregationResponse).GetMessage()); err != nil || len(b.Shares) == 0 {
			t.Errorf("the bundle relayed to %s: %v, %d shares", to, err, len(b.Shares))
			return resp, err
		}
		s := &b.Shares[0]
		s.Sealed = slices.Clone(s.Sealed) // not the aggregator's copy
		s.Sealed[len(s.Sealed)/2] ^= 0x40
		msg, err := b.MarshalBinary()
		if err != nil {
			return nil, err
		}
		select {
		case from <- s.From:
		default:
		}
		return &fxv1.SecureAggregationResponse{Ready: true, Message: msg}, nil
	})
}

// A share altered on its way to a site: the site refuses to mask its
// update with it and fails the round, naming the sender and the recipient
// of the share (the envoy reports this to the director, which drops the
// site and tells the aggregator why); its update never leaves the site.
// With enough sites left the round closes with their mean; with fewer
// than the threshold it fails, and its error says why the site left.
func TestSecureTamperedShare(t *testing.T) {
	for _, tc := range []struct {
		name      string
		threshold int
	}{{"round goes on without the site", 2}, {"too few left: the round fails naming why", 3}} {
		t.Run(tc.name, func(t *testing.T) {
			plan := parsePlan(t, fmt.Sprintf(`
name: test
rounds: 1
participants: {min: 3}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 30s, min_reporting: 2}
aggregation: {secure: true, secure_threshold: %d}
`, tc.threshold))
			f := newFederation(t, plan, "alpha", "beta", "gamma")
			from := make(chan string, 1)
			f.serverOptions = []grpc.ServerOption{tamperBundleTo(t, "beta", from)}
			f.start()
			ctx := t.Context()
			a := f.secureCollab(ctx, "alpha", &stepRunner{Step: 0.5, Samples: 1})
			b := f.secureCollab(ctx, "beta", &stepRunner{Step: 2, Samples: 2})
			g := f.secureCollab(ctx, "gamma", &stepRunner{Step: -1, Samples: 3})

			var err error
			select {
			case err = <-b:
			case <-time.After(30 * time.Second):
				t.Fatal("beta did not fail on the tampered share")
			}
			sender := <-from
			var re *collaborator.RoundError
			if !errors.As(err, &re) || re.Round != 1 {
				t.Fatalf("beta: %v, want a failure of round 1", err)
			}
			if want := fmt.Sprintf("the share from %q to %q fails authentication: tampered with", sender, "beta"); !strings.Contains(err.Error(), want) {
				t.Fatalf("beta: %v, want it to say %q", err, want)
			}
			// What the director does with the envoy's report.
			f.agg.Drop("beta", re.Err.Error())

			runErr := f.wait(60 * time.Second)
			for name, done := range map[string]<-chan error{"alpha": a, "gamma": g} {
				if err := <-done; !finished(err) {
					t.Errorf("%s: %v, want quit", name, err)
				}
			}
			sums := f.sink.summaries()
			if tc.threshold == 3 {
				if runErr == nil {
					t.Fatal("the round closed with two of three sites under a threshold of 3")
				}
				for _, want := range []string{"fewer than the threshold 3", "beta left the round", "fails authentication"} {
					if !strings.Contains(runErr.Error(), want) {
						t.Errorf("the round's failure %q does not say %q", runErr, want)
					}
				}
				if len(sums) != 0 {
					t.Errorf("summaries %+v of a failed round", sums)
				}
				return
			}
			if runErr != nil {
				t.Fatalf("Run: %v", runErr)
			}
			if len(sums) == 0 || strings.Join(sums[0].Reported, ",") != "alpha,gamma" {
				t.Fatalf("summaries %+v, want round 1 with alpha and gamma alone", sums)
			}
			// (1·0.5 + 3·(−1)) / 4 = −0.625: beta's update is not in it.
			for i, v := range values(readModel(t, f.dir, 1), "fc.weight") {
				want := float64(i+1) - 0.625
				if d := math.Abs(float64(v) - want); d > secureTolerance(2, experiment.DefaultSecureRange, want) {
					t.Errorf("fc.weight[%d] = %v, want %v", i, v, want)
				}
			}
		})
	}
}

// Messages of the key exchange and the unmasking replayed in round 2 from
// round 1 — by the site that sent them, over its own authenticated
// connection — are refused, each with an error that says it is replayed
// or misrouted, and one replayed in another site's name is refused naming
// both; the round then closes as if they had not been sent.
func TestSecureReplayedMessagesRefused(t *testing.T) {
	plan := parsePlan(t, `
name: test
rounds: 2
participants: {min: 2}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 30s, min_reporting: 2}
aggregation: {secure: true}
`)
	f := newFederation(t, plan, "alpha", "beta")
	type key struct {
		who  string
		step fxv1.SecureAggregationRequest_Step
	}
	var (
		mu      sync.Mutex
		round1  = map[key][]byte{}   // the messages each site sent in round 1
		refused = map[string]error{} // the replays' answers, by what was replayed
		tried   = map[key]bool{}     // replayed in round 2 already
	)
	// replay sends msg as a step of round 2 over a connection of its own
	// with the certificate of site as.
	replay := func(as string, step fxv1.SecureAggregationRequest_Step, msg []byte) error {
		k := f.ca.Keyring(pki.RoleEnvoy, as)
		conn, err := grpc.NewClient(f.addr, testpki.DialOptions(k, "localhost")...)
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = fxv1.NewAggregatorClient(conn).SecureAggregation(t.Context(), &fxv1.SecureAggregationRequest{
			ExperimentId: experimentID, Collaborator: as, Round: 2, Step: step, Message: msg})
		return err
	}
	f.serverOptions = []grpc.ServerOption{grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		r, ok := req.(*fxv1.SecureAggregationRequest)
		if !ok || len(r.GetMessage()) == 0 {
			return h(ctx, req)
		}
		k := key{r.GetCollaborator(), r.GetStep()}
		mu.Lock()
		if r.GetRound() == 1 {
			round1[k] = slices.Clone(r.GetMessage())
			mu.Unlock()
			return h(ctx, req)
		}
		first := !tried[k]
		tried[k] = true
		old := round1[k]
		alphaAdvert := round1[key{"alpha", fxv1.SecureAggregationRequest_ADVERTISE}]
		mu.Unlock()
		if first {
			// Before the site's own message of round 2 arrives, its
			// message of round 1 again; and before beta advertises, beta
			// sending alpha's advertisement.
			err := replay(k.who, k.step, old)
			mu.Lock()
			refused[k.who+" "+k.step.String()] = err
			mu.Unlock()
			if k == (key{"beta", fxv1.SecureAggregationRequest_ADVERTISE}) {
				err := replay("beta", k.step, alphaAdvert)
				mu.Lock()
				refused["beta as alpha"] = err
				mu.Unlock()
			}
		}
		return h(ctx, req)
	})}
	f.start()
	ctx := t.Context()
	a := f.secureCollab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1})
	b := f.secureCollab(ctx, "beta", &stepRunner{Step: 3, Samples: 1})
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for name, done := range map[string]<-chan error{"alpha": a, "beta": b} {
		if err := <-done; !finished(err) {
			t.Errorf("%s: %v, want quit", name, err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for _, who := range []string{"alpha", "beta"} {
		for _, step := range []fxv1.SecureAggregationRequest_Step{fxv1.SecureAggregationRequest_ADVERTISE, fxv1.SecureAggregationRequest_SHARE_KEYS, fxv1.SecureAggregationRequest_UNMASK} {
			what := who + " " + step.String()
			err, ok := refused[what]
			switch {
			case !ok:
				t.Errorf("%s was not replayed in round 2", what)
			case status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "replayed or misrouted") || !strings.Contains(err.Error(), who):
				t.Errorf("%s replayed from round 1: %v, want it refused as replayed, naming %s", what, err, who)
			}
		}
	}
	if err := refused["beta as alpha"]; status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), `beta sent keys in the name of "alpha"`) {
		t.Errorf("beta sending alpha's advertisement: %v, want it refused naming both", err)
	}
	sums := f.sink.summaries()
	if len(sums) < 2 || strings.Join(sums[1].Reported, ",") != "alpha,beta" {
		t.Fatalf("summaries %+v, want round 2 with both sites", sums)
	}
	// Each round moves every weight by (1 + 3) / 2.
	for i, v := range values(readModel(t, f.dir, 2), "fc.bias") {
		if d := math.Abs(float64(v) - 4); d > 2*secureTolerance(2, experiment.DefaultSecureRange, 4) {
			t.Errorf("round 2 bias[%d] = %v, want 4", i, v)
		}
	}
}

// Secure aggregation with differential privacy at every site: each site
// clips its update to C and noises it with N(0, (σC)²) before masking it,
// and charges its ledger for the round. The rounds complete; each round's
// model moves by the weighted mean of the clipped updates plus noise within
// 6 standard deviations of the mean's noise (σC·√Σw²/Σw ≈ 0.031), so
// neither by the unclipped mean (0.37 away) nor by the clipped one exactly;
// and each site's ledger records one charge for each round, with ε > 0 at
// δ. (σ is small so that the clipping shows beside the noise; the budget
// is lax to match.)
func TestSecureWithDP(t *testing.T) {
	const (
		clip, sigma, delta = 1.0, 0.05, 1e-5
		rounds             = 2
	)
	plan := parsePlan(t, `
name: test
rounds: 2
participants: {min: 3}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 30s, min_reporting: 3}
aggregation: {secure: true, secure_threshold: 2}
`)
	f := newFederation(t, plan, "alpha", "beta", "gamma")
	f.start()
	ctx := t.Context()
	// Updates of norm |step|·√8 (8 weights), far above C = 1: clipped to
	// ±1/√8 an element. Their weighted mean unclipped is
	// (1·1 + 3·0.5 + 2·(−2))/6 = −0.25, clipped (1 + 3 − 2)/6/√8 ≈ 0.118.
	type update struct {
		step    float32
		samples int64
	}
	steps := map[string]update{"alpha": {1, 1}, "beta": {0.5, 3}, "gamma": {-2, 2}}
	ledgers := map[string]*privacy.Ledger{}
	var results []<-chan error
	for _, name := range f.parts {
		l, err := privacy.Open(filepath.Join(t.TempDir(), "privacy.json"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		ledgers[name] = l
		s := steps[name]
		results = append(results, f.secureCollabDP(ctx, name, &stepRunner{Step: s.step, Samples: s.samples}, &collaborator.Privacy{
			Noise: sigma, Clip: clip, Delta: delta, Ledger: l, Dataset: "records",
			Budget: privacy.Budget{Epsilon: 1e6, Delta: delta}, Name: "researcher/test",
		}))
	}
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for i, res := range results {
		if err := <-res; !finished(err) {
			t.Errorf("collaborator %s: %v, want quit", f.parts[i], err)
		}
	}
	sums := f.sink.summaries()
	if len(sums) < rounds || strings.Join(sums[0].Reported, ",") != "alpha,beta,gamma" || strings.Join(sums[1].Reported, ",") != "alpha,beta,gamma" {
		t.Fatalf("summaries %+v, want every site in both rounds", sums)
	}

	var w, w2, clipped float64
	for _, s := range steps {
		sw := float64(s.samples)
		w, w2 = w+sw, w2+sw*sw
		clipped += sw * math.Copysign(clip/math.Sqrt(8), float64(s.step))
	}
	clipped /= w
	noise := sigma * clip * math.Sqrt(w2) / w // of the mean, per element
	noisy := 0
	for round := 1; round <= rounds; round++ {
		prev, cur := readModel(t, f.dir, round-1), readModel(t, f.dir, round)
		for _, name := range []string{"fc.weight", "fc.bias"} {
			p, c := values(prev, name), values(cur, name)
			for i := range c {
				moved := float64(c[i]) - float64(p[i])
				if d := math.Abs(moved - clipped); d > 6*noise {
					t.Errorf("round %d %s[%d] moved by %v, want the clipped mean %.4f within 6 × %.4f of noise", round, name, i, moved, clipped, noise)
				}
				if math.Abs(moved-clipped) > 1e-4 {
					noisy++
				}
			}
		}
	}
	if noisy == 0 {
		t.Error("every weight moved by the clipped mean exactly: no noise was added")
	}

	for _, name := range f.parts {
		entries, err := ledgers[name].Entries("records")
		if err != nil {
			t.Fatal(err)
		}
		var charged []int
		for _, e := range entries {
			charged = append(charged, e.Round)
			if e.Experiment != experimentID || e.Noise != sigma || e.Clip != clip {
				t.Errorf("%s's ledger entry %+v, want experiment %s, σ %v, C %v", name, e, experimentID, sigma, clip)
			}
		}
		if !slices.Equal(charged, []int{1, 2}) {
			t.Errorf("%s's ledger charged rounds %v, want [1 2]", name, charged)
		}
		eps, err := privacy.EpsilonOf(entries, delta)
		if err != nil || !(eps > 0) || math.IsInf(eps, 0) {
			t.Errorf("%s's ledger: ε %v (%v), want a finite ε > 0 for its two rounds", name, eps, err)
		}
	}
}
