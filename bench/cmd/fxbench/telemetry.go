package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
)

// telemetryTrial is one federation's run, with or without metrics.
type telemetryTrial struct {
	Metrics bool
	// Rounds are the round times (the first, from the submission, is left
	// out of Median).
	Rounds []float64
	Median float64
	// Scrapes and ScrapedBytes count the /metrics reads of the trial,
	// Spans the spans the parties exported.
	Scrapes      int64
	ScrapedBytes int64
	Spans        int64
	// CPU is the CPU seconds (user + system) all the parties' processes
	// spent from the submission to the experiment's end: on a shared
	// machine a steadier measure of what metrics and tracing cost than
	// the wall time.
	CPU float64
}

type telemetryResult struct {
	Start             time.Time
	Uptime, UptimeEnd string
	Envoys, Rounds    int
	Scrape            string
	Trials            []telemetryTrial
	// Off and On are the medians of the trials' medians without and with
	// metrics and tracing. Pairs are each on trial's cost against the off
	// trial just before it (on/off − 1); Cost is their median (goal < 2 %):
	// pairing cancels the drift of a shared machine between trials.
	Off, On, Cost float64
	Pairs         []float64
	// CPUPairs and CPUCost are the same for the parties' CPU seconds.
	CPUPairs []float64
	CPUCost  float64
}

// telemetryMain is fxbench telemetry: the cost of metrics (listeners and
// their scrapes) and tracing (every party exporting its spans by OTLP to a
// collector in this process) on round time, with a director and N envoys
// as separate fx processes running the built-in MLP on Fashion-MNIST, in
// trials that alternate both off and both on.
func telemetryMain(args []string) error {
	fs := flag.NewFlagSet("telemetry", flag.ExitOnError)
	envoys := fs.Int("envoys", 10, "envoys, each a process")
	rounds := fs.Int("rounds", 8, "rounds per trial (the first, with start-up, is left out)")
	trials := fs.Int("trials", 2, "trials of each kind, alternated: off, on, off, on, ...")
	scrape := fs.Duration("scrape", time.Second, "how often every party's /metrics is read in the trials with metrics (Prometheus's default is 1m; 15s is common)")
	pkiDir, fxBin, out, keep := federationFlags(fs)
	_ = fs.Parse(args)
	if *envoys < 1 || *rounds < 2 || *trials < 1 || *scrape <= 0 {
		return errors.New("want -envoys ≥ 1, -rounds ≥ 2, -trials ≥ 1, -scrape > 0")
	}
	if _, err := os.Stat(fashionDir); err != nil {
		return fmt.Errorf("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): %w", err)
	}
	setup, err := setUpFederation(*fxBin, "fxbench-telemetry-", *keep, *pkiDir, *envoys)
	if err != nil {
		return err
	}
	defer setup.done()
	bin, work, p := setup.bin, setup.work, setup.pki
	collector, err := startSpanSink()
	if err != nil {
		return err
	}
	defer collector.stop()
	res := &telemetryResult{Start: time.Now().UTC(), Uptime: uptime(), Envoys: *envoys, Rounds: *rounds, Scrape: scrape.String()}
	var off, on []float64
	for i := range 2 * *trials {
		t := telemetryTrial{Metrics: i%2 == 1}
		if err := runTelemetryTrial(bin, p, *envoys, *rounds, *scrape, collector, filepath.Join(work, fmt.Sprintf("trial-%d", i)), &t); err != nil {
			return err
		}
		kind := "off"
		if t.Metrics {
			kind, on = "on", append(on, t.Median)
		} else {
			off = append(off, t.Median)
		}
		fmt.Printf("metrics and tracing %s: rounds %s s, median %.3f s; CPU %.1f s; %d scrapes, %.1f KiB each; %d spans\n", kind, fmtSeconds(t.Rounds), t.Median, t.CPU, t.Scrapes, float64(t.ScrapedBytes)/float64(max(1, t.Scrapes))/1024, t.Spans)
		res.Trials = append(res.Trials, t)
	}
	res.Off, res.On = median(off), median(on)
	for i := range on {
		res.Pairs = append(res.Pairs, on[i]/off[i]-1)
		res.CPUPairs = append(res.CPUPairs, res.Trials[2*i+1].CPU/res.Trials[2*i].CPU-1)
	}
	res.Cost, res.CPUCost = median(res.Pairs), median(res.CPUPairs)
	res.UptimeEnd = uptime()
	fmt.Printf("round with metrics and tracing %.3f s, without %.3f s; paired costs %s %%, median %+.1f %% (goal < 2 %%); CPU of all parties, paired: %s %%, median %+.1f %%; %d envoys, scraped every %s; load %s → %s\n",
		res.On, res.Off, percents(res.Pairs), 100*res.Cost, percents(res.CPUPairs), 100*res.CPUCost, *envoys, scrape, res.Uptime, res.UptimeEnd)
	if *out != "" {
		return atomicfile.ReplaceJSON(*out, res)
	}
	return nil
}

// runTelemetryTrial runs one experiment on a fresh federation, scraping
// every party's metrics while it runs when t.Metrics.
func runTelemetryTrial(bin string, p *benchPKI, n, rounds int, scrape time.Duration, collector *spanSink, dir string, t *telemetryTrial) error {
	otlp := ""
	if t.Metrics {
		otlp = collector.addr
	}
	spansBefore := collector.spans.Load()
	fed, err := startProcFederation(bin, p, n, filepath.Join(dir, "fed"), fedOptions{
		python: "/usr/bin/python3", threads: "1", tag: "fashion-mnist", metrics: t.Metrics, otlp: otlp,
		shard: func(i, n int) string {
			return fmt.Sprintf("{kind: idx, path: %s, shard: %d/%d, seed: 1}", fashionDir, i, n)
		},
	})
	if err != nil {
		return err
	}
	defer fed.stop()
	exp := filepath.Join(dir, "experiment")
	if err := os.MkdirAll(exp, 0o700); err != nil {
		return err
	}
	name := "telemetry"
	plan := fmt.Sprintf(`name: %s
rounds: %d
participants: {min: %d, tags: [fashion-mnist]}
runner: {kind: builtin, model: mlp, hyperparameters: {epochs: 1, batch_size: 64}}
aggregation: {algorithm: fedavg}
stragglers: {deadline: 10m, min_reporting: %d}
`, name, rounds, n, n)
	if err := os.WriteFile(filepath.Join(exp, experiment.PlanFile), []byte(plan), 0o600); err != nil {
		return err
	}
	ctx, stopScraping := context.WithCancel(context.Background())
	var scrapes, scraped atomic.Int64
	var wg sync.WaitGroup
	for _, addr := range fed.metrics {
		wg.Go(func() {
			tick := time.NewTicker(scrape)
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				if n, err := readMetrics(ctx, "http://"+addr+"/metrics"); err == nil {
					scrapes.Add(1)
					scraped.Add(n)
				}
			}
		})
	}
	cpu := func() float64 {
		var sum float64
		for _, p := range fed.procs {
			if c, err := procCPU(p.Process.Pid); err == nil {
				sum += c
			}
		}
		return sum
	}
	cpuBefore := cpu()
	times, _, err := fed.run(exp, name, rounds)
	t.CPU = cpu() - cpuBefore
	stopScraping()
	wg.Wait()
	if err != nil {
		return fmt.Errorf("metrics %v: %w (logs in %s)", t.Metrics, err, fed.dir)
	}
	t.Rounds, t.Median = times, median(times[1:])
	t.Scrapes, t.ScrapedBytes = scrapes.Load(), scraped.Load()
	fed.stop() // flushes the parties' spans
	t.Spans = collector.spans.Load() - spansBefore
	return nil
}

// spanSink is an OTLP/gRPC trace collector that counts the spans it is
// sent and keeps none: the far end of the parties' exporters.
type spanSink struct {
	coltracepb.UnimplementedTraceServiceServer
	addr  string
	srv   *grpc.Server
	spans atomic.Int64
}

func startSpanSink() (*spanSink, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &spanSink{addr: lis.Addr().String(), srv: grpc.NewServer()}
	coltracepb.RegisterTraceServiceServer(s.srv, s)
	go s.srv.Serve(lis)
	return s, nil
}

func (s *spanSink) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	for _, rs := range req.GetResourceSpans() {
		for _, ss := range rs.GetScopeSpans() {
			s.spans.Add(int64(len(ss.GetSpans())))
		}
	}
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

func (s *spanSink) stop() { s.srv.Stop() }

// readMetrics reads a /metrics page as Prometheus would and returns its
// size.
func readMetrics(ctx context.Context, url string) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("%s: %s", url, resp.Status)
	}
	return io.Copy(io.Discard, resp.Body)
}

// percents formats fractions as signed percentages.
func percents(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf("%+.1f", 100*x)
	}
	return strings.Join(parts, ", ")
}
