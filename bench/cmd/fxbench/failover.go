package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/internal/testpg"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// failoverGoal is issue 19's bound on a takeover: the standby serves
// within it, and the round under way completes within it plus one round.
const failoverGoal = 15 * time.Second

// failoverTrial is one federation's failover.
type failoverTrial struct {
	// Rounds are the round times before the kill (the first from the
	// submission, with start-up); RoundMedian is their median from the
	// second on: "one round time".
	Rounds      []float64
	RoundMedian float64
	// KillRound is the round under way when the leader was killed, Into
	// how many seconds after the previous round's aggregate.
	KillRound int
	Into      float64
	// Serving is the seconds from the kill until the standby's /readyz
	// answered 200; NextRound until the aggregate of the next round to
	// complete (its event's time), which was round NextRoundNumber.
	Serving         float64
	NextRound       float64
	NextRoundNumber int
}

type failoverResult struct {
	Start             time.Time
	Uptime, UptimeEnd string
	Envoys, Rounds    int
	Plan              string
	Trials            []failoverTrial
	// Medians over the trials.
	Serving, NextRound, RoundMedian float64
	Goal                            float64
	// ServingMet: median Serving < Goal; NextRoundMet: median NextRound
	// < Goal + median RoundMedian.
	ServingMet, NextRoundMet bool
}

// failoverMain is fxbench failover: see usage.
func failoverMain(args []string) error {
	fs := flag.NewFlagSet("failover", flag.ExitOnError)
	envoys := fs.Int("envoys", 3, "envoys, each a process given both directors' addresses")
	trials := fs.Int("trials", 3, "kills, each on a fresh federation and database")
	rounds := fs.Int("rounds", 8, "the experiment's rounds (it is not run to the end)")
	killAfter := fs.Int("kill-after", 3, "rounds completed before the kill; the leader dies half a round into the next")
	epochs := fs.Int("epochs", 50, "local epochs a round (built-in MLP, 4000 synthetic samples per envoy): sets the round time")
	pkiDir := fs.String("pki", "bench/out/pki", "certificate cache (shared with capacity)")
	fxBin := fs.String("fx", "bench/out/fx", "the fx binary the directors and envoys run")
	out := fs.String("out", "", "write the result as JSON here")
	keep := fs.Bool("keep", false, "keep the work directory (configurations, logs) and say where")
	report := fs.String("report", "", "print the RESULTS.md section of this earlier -out file and exit")
	_ = fs.Parse(args)
	if *report != "" {
		p := func(format string, a ...any) { fmt.Printf(format, a...) }
		return reportFailover(p, filepath.Dir(*report), filepath.Base(*report))
	}
	if *envoys < 1 || *trials < 1 || *killAfter < 2 || *rounds < *killAfter+2 || *epochs < 1 {
		return errors.New("want -envoys ≥ 1, -trials ≥ 1, -kill-after ≥ 2 (a round time to measure), -rounds ≥ kill-after + 2, -epochs ≥ 1")
	}
	setup, err := setUpFederation(*fxBin, "fxbench-failover-", *keep, *pkiDir, *envoys)
	if err != nil {
		return err
	}
	defer setup.done()
	bin, work, p := setup.bin, setup.work, setup.pki
	pg, err := testpg.Launch()
	if err != nil {
		return fmt.Errorf("postgresql: %w", err)
	}
	defer pg.Stop()
	res := &failoverResult{Start: time.Now().UTC(), Uptime: uptime(), Envoys: *envoys, Rounds: *rounds, Goal: failoverGoal.Seconds(),
		Plan: fmt.Sprintf("built-in MLP (64 features, hidden [64], batch 64, %d local epochs a round) on synthetic shards of %d training samples", *epochs, failoverSamples)}
	fmt.Printf("load at start: %s\n", res.Uptime)
	var serving, next, round []float64
	for i := range *trials {
		dsn, err := pg.CreateDatabase()
		if err != nil {
			return err
		}
		t, err := runFailoverTrial(bin, p, dsn, *envoys, *rounds, *killAfter, *epochs, filepath.Join(work, fmt.Sprintf("trial-%d", i+1)))
		if err != nil {
			return fmt.Errorf("trial %d: %w", i+1, err)
		}
		fmt.Printf("trial %d: rounds %s s before the kill (median %.2f s); leader killed %.2f s into round %d; standby serving after %.2f s, round %d completed %.2f s after the kill\n",
			i+1, fmtSeconds(t.Rounds), t.RoundMedian, t.Into, t.KillRound, t.Serving, t.NextRoundNumber, t.NextRound)
		res.Trials = append(res.Trials, t)
		serving, next, round = append(serving, t.Serving), append(next, t.NextRound), append(round, t.RoundMedian)
	}
	res.Serving, res.NextRound, res.RoundMedian = median(serving), median(next), median(round)
	res.ServingMet = res.Serving < res.Goal
	res.NextRoundMet = res.NextRound < res.Goal+res.RoundMedian
	res.UptimeEnd = uptime()
	fmt.Printf("failover, medians of %d trials: standby serving %.2f s after the kill (goal < %.0f s: %s); next round completed %.2f s after it (goal < %.0f s + one round of %.2f s = %.2f s: %s); load %s → %s\n",
		*trials, res.Serving, res.Goal, metWord(res.ServingMet), res.NextRound, res.Goal, res.RoundMedian, res.Goal+res.RoundMedian, metWord(res.NextRoundMet), res.Uptime, res.UptimeEnd)
	if *out != "" {
		return atomicfile.ReplaceJSON(*out, res)
	}
	return nil
}

func metWord(ok bool) string {
	if ok {
		return "met"
	}
	return "missed"
}

// runFailoverTrial starts two directors on the database dsn and one
// data_dir, the first leading, and n envoys given both addresses; runs an
// experiment until killAfter rounds have completed, kills the leader
// (SIGKILL) half a round later and times the standby's takeover.
func runFailoverTrial(bin string, p *benchPKI, dsn string, n, rounds, killAfter, epochs int, dir string) (failoverTrial, error) {
	var t failoverTrial
	f, err := startFailoverFed(bin, p, dsn, n, dir)
	if err != nil {
		return t, err
	}
	defer f.stop()
	exp := filepath.Join(dir, "experiment")
	if err := os.MkdirAll(exp, 0o700); err != nil {
		return t, err
	}
	// The plan of e2e TestDirectorFailover with more local epochs: rounds
	// long enough for a kill to land mid-round.
	name := "failover"
	plan := fmt.Sprintf(`name: %s
rounds: %d
participants: {min: %d, tags: [synthetic]}
runner: {kind: builtin, model: mlp, hyperparameters: {hidden: [64], lr: 0.05, batch_size: 64, epochs: %d}}
aggregation: {algorithm: fedavg}
stragglers: {deadline: 2m, min_reporting: %d}
`, name, rounds, n, epochs, n)
	if err := os.WriteFile(filepath.Join(exp, experiment.PlanFile), []byte(plan), 0o600); err != nil {
		return t, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	submitted := time.Now()
	if _, err := f.client.Submit(ctx, exp, experiment.SubmitOptions{}); err != nil {
		return t, err
	}
	// Follow the aggregates (the director-wide train metrics, one per
	// round) through the failover: the client follows the leader.
	aggregates := make(chan aggregate, rounds+1)
	watchCtx, stopWatch := context.WithCancel(ctx)
	var watch sync.WaitGroup
	watch.Go(func() {
		defer close(aggregates)
		_, _ = f.client.WaitFunc(watchCtx, name, func(ev *fxv1.MetricEvent) {
			if ev.GetCollaborator() == "" && ev.GetTask() == runner.TaskTrain {
				aggregates <- aggregate{round: int(ev.GetRound()), at: ev.GetTime().AsTime()}
			}
		})
	})
	defer func() { stopWatch(); watch.Wait() }()
	next := func() (aggregate, error) {
		select {
		case a, ok := <-aggregates:
			if !ok {
				return a, errors.New("the metric stream ended before the next round's aggregate (logs in " + dir + ")")
			}
			return a, nil
		case <-ctx.Done():
			return aggregate{}, fmt.Errorf("waiting for a round's aggregate: %w (logs in %s)", ctx.Err(), dir)
		}
	}
	prev := submitted
	var last aggregate
	for len(t.Rounds) < killAfter {
		if last, err = next(); err != nil {
			return t, err
		}
		t.Rounds = append(t.Rounds, last.at.Sub(prev).Seconds())
		prev = last.at
	}
	t.RoundMedian = median(t.Rounds[1:])
	t.KillRound = last.round + 1
	time.Sleep(time.Until(last.at.Add(time.Duration(t.RoundMedian / 2 * float64(time.Second)))))
	if len(aggregates) > 0 {
		return t, fmt.Errorf("round %d completed before the kill: rounds are too short to kill one midway (raise -epochs)", t.KillRound)
	}
	if err := f.leader.Process.Kill(); err != nil {
		return t, fmt.Errorf("kill the leader: %w", err)
	}
	killed := time.Now()
	t.Into = killed.Sub(last.at).Seconds()
	serving, err := waitReady(ctx, f.standbyProbe)
	if err != nil {
		return t, fmt.Errorf("the standby never served: %w (logs in %s)", err, dir)
	}
	t.Serving = serving.Sub(killed).Seconds()
	a, err := next()
	if err != nil {
		return t, err
	}
	if a.at.Before(killed) {
		return t, fmt.Errorf("round %d completed %.2f s before the kill", a.round, killed.Sub(a.at).Seconds())
	}
	t.NextRound, t.NextRoundNumber = a.at.Sub(killed).Seconds(), a.round
	return t, nil
}

// aggregate is a round's completion: its aggregate train metrics' time.
type aggregate struct {
	round int
	at    time.Time
}

// failoverSamples is each envoy's share of the synthetic training set.
const failoverSamples = 4000

// failoverFed is two directors sharing a database and a data_dir, and
// envoys and a researcher's client given both addresses.
type failoverFed struct {
	procs        []*exec.Cmd
	leader       *exec.Cmd
	standbyProbe string // the standby's /readyz
	client       *experiment.Client
	cancel       context.CancelFunc
}

// startFailoverFed starts director-1 and waits until it leads, then
// director-2 and waits until it stands by, then n envoys with both
// addresses, and dials both as a researcher.
func startFailoverFed(bin string, p *benchPKI, dsn string, n int, dir string) (*failoverFed, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &failoverFed{cancel: cancel}
	ok := false
	defer func() {
		if !ok {
			f.stop()
		}
	}()
	start := func(name, config string, args ...string) (*exec.Cmd, error) {
		file := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(file, []byte(config), 0o600); err != nil {
			return nil, err
		}
		logf, err := os.Create(filepath.Join(dir, name+".log"))
		if err != nil {
			return nil, err
		}
		defer logf.Close()
		cmd := exec.CommandContext(ctx, bin, append(args, "--config", file)...)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
		cmd.WaitDelay = 15 * time.Second
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		f.procs = append(f.procs, cmd)
		return cmd, nil
	}
	var addrs []string
	wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer wcancel()
	d := p.Director
	for i := range 2 {
		port, err1 := freePort()
		mport, err2 := freePort()
		if err := errors.Join(err1, err2); err != nil {
			return nil, err
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		readyz := fmt.Sprintf("http://127.0.0.1:%d/readyz", mport)
		cmd, err := start(fmt.Sprintf("director-%d", i+1), fmt.Sprintf(`listen_address: %s
advertise: {host: 127.0.0.1, server_name: localhost}
tls: {cert: %s, key: %s, ca: %s, crl: %s}
data_dir: %s
store: {kind: postgres, postgres: {dsn: %q}}
metrics: {listen: "127.0.0.1:%d"}
review_policy: auto
aggregator: {host: 127.0.0.1, port_min: 0, port_max: 0}
`, addr, d.Cert, d.Key, d.CA, d.CRL, filepath.Join(dir, "data"), dsn, mport), "director", "start")
		if err != nil {
			return nil, err
		}
		addrs = append(addrs, addr)
		if i == 0 {
			// director-1 alone: it leads.
			if _, err := waitReady(wctx, readyz); err != nil {
				return nil, fmt.Errorf("director-1 did not lead: %w (logs in %s)", err, dir)
			}
			f.leader = cmd
			continue
		}
		if err := waitStandby(wctx, readyz); err != nil {
			return nil, fmt.Errorf("director-2 did not stand by: %w (logs in %s)", err, dir)
		}
		f.standbyProbe = readyz
	}
	both := strings.Join(addrs, ",")
	// Envoys as a site runs them: the default retry and timeouts.
	for i := 1; i <= n; i++ {
		e := p.envoyFiles(i)
		name := envoyName(i)
		if _, err := start(name, fmt.Sprintf(`name: %s
director: {address: "%s", server_name: localhost}
tls: {cert: %s, key: %s, ca: %s}
work_dir: %s
tags: [synthetic]
shard: {kind: synthetic, shard: %d/%d, seed: 1, features: 64, train_samples: %d}
review: {policy: auto}
max_experiments: 1
`, name, both, e.Cert, e.Key, e.CA, filepath.Join(dir, name), i, n, failoverSamples*n), "envoy", "start"); err != nil {
			return nil, err
		}
	}
	rdir := filepath.Join(p.dir, "researcher")
	rfiles := pki.PartyFiles(rdir, "bench")
	if _, err := pki.NewKeyring(pki.KeyringConfig{Files: rfiles}); err != nil {
		if _, rfiles, err = p.ca.IssueTo(rdir, pki.IssueRequest{Role: pki.RoleResearcher, Name: "bench"}); err != nil {
			return nil, err
		}
	}
	c, err := experiment.Dial(wctx, experiment.ClientConfig{Director: both, ServerName: "localhost", Cert: rfiles.Cert, Key: rfiles.Key, CA: rfiles.CA})
	if err != nil {
		return nil, err
	}
	f.client = c
	if err := c.WaitForEnvoys(wctx, n); err != nil {
		return nil, fmt.Errorf("federation of %d envoys: %w (logs in %s)", n, err, dir)
	}
	ok = true
	return f, nil
}

// stop ends every process still running (SIGINT, as an operator would)
// and waits.
func (f *failoverFed) stop() {
	if f.client != nil {
		f.client.Close()
	}
	f.cancel()
	for _, p := range f.procs {
		_ = p.Wait()
	}
}

// readyzPoll is how often a director's /readyz is asked: the resolution
// of the serving time.
const readyzPoll = 20 * time.Millisecond

// waitReady polls url until it answers 200 and returns when it did.
func waitReady(ctx context.Context, url string) (time.Time, error) {
	var last error
	for {
		code, body, err := getReadyz(ctx, url)
		if err == nil && code == http.StatusOK {
			return time.Now(), nil
		}
		if err == nil {
			err = fmt.Errorf("%d %s", code, body)
		}
		last = err
		select {
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("%s: %w (last answer: %v)", url, ctx.Err(), last)
		case <-time.After(readyzPoll):
		}
	}
}

// waitStandby polls url until it says the director stands by.
func waitStandby(ctx context.Context, url string) error {
	var last string
	for {
		code, body, err := getReadyz(ctx, url)
		if err == nil && code == http.StatusServiceUnavailable && strings.Contains(body, "standby") {
			return nil
		}
		last = fmt.Sprintf("%d %s %v", code, body, err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last answer: %s)", url, ctx.Err(), last)
		case <-time.After(readyzPoll):
		}
	}
}

func getReadyz(ctx context.Context, url string) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

// reportFailover writes the section of `fxbench failover` from dir/file.
func reportFailover(p func(string, ...any), dir, file string) error {
	p("## Director failover\n\n")
	var r failoverResult
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err == nil {
		err = json.Unmarshal(b, &r)
	}
	if err != nil {
		p("Not measured (no %s).\n\n", file)
		return err
	}
	p("Two directors as separate `fx director start` processes on one PostgreSQL database (a server started for the run, unix socket, fsync off) and one data_dir, the first leading, the second standing by; %d envoys as separate `fx` processes given both addresses, with the envoy's default retry (0.5 s doubling to 30 s); %s, %d rounds planned. ", r.Envoys, r.Plan, r.Rounds)
	p("After the first rounds the leader is killed (SIGKILL) half a round into the next; **serving** is the time from the kill until the standby's `/readyz` answers 200 (polled every %s; it includes the 4 s a new leader waits for a predecessor that did not step down to have stopped its aggregators), **next round** until the aggregate of the round under way completed (its metric event's time), resumed by the new leader. ", readyzPoll)
	p("A round is the time from one round's aggregate to the next, median from the second round. A fresh federation and database per trial. Started %s, load `%s`; ended `%s`.\n\n", r.Start.Format("15:04 MST"), r.Uptime, r.UptimeEnd)
	p("| trial | rounds before the kill (s) | round median (s) | killed | standby serving (s) | next round completed (s) | goal: next < %.0f s + one round |\n|---|---|---|---|---|---|---|\n", r.Goal)
	for i, t := range r.Trials {
		p("| %d | %s | %.2f | %.2f s into round %d | %.2f | %.2f (round %d) | < %.2f |\n", i+1, fmtSeconds(t.Rounds), t.RoundMedian, t.Into, t.KillRound, t.Serving, t.NextRound, t.NextRoundNumber, r.Goal+t.RoundMedian)
	}
	p("\nMedians: **standby serving %.2f s** after the kill (goal < %.0f s: %s), **next round completed %.2f s** after it (goal < %.0f s + one round of %.2f s = %.2f s: %s).\n\n",
		r.Serving, r.Goal, metWord(r.ServingMet), r.NextRound, r.Goal, r.RoundMedian, r.Goal+r.RoundMedian, metWord(r.NextRoundMet))
	return nil
}
