package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// capacityResult is what `fxbench capacity` writes as JSON.
type capacityResult struct {
	N             int
	Period        string
	Window        string
	Watch         bool
	MaxConnecting int
	Start         time.Time
	Uptime        string // load when the run started
	Note          string `json:",omitempty"` // added by hand to a kept result
	Certificates  issueStats
	Raw, Director *sideResult
	// Ratios director / raw.
	HeartbeatP50Ratio, HeartbeatP99Ratio float64
	HeartbeatP99SliceMedianRatio         float64
	ServerCPURatio, ServerRSSRatio       float64
}

// sideResult is one server under the load: the director or the baseline.
type sideResult struct {
	Server string
	// Connect: every simulated envoy's first call, which includes the TLS
	// handshake (RegisterEnvoy on the director, Check on the baseline).
	// FirstCallErrors counts failed attempts (each retried with backoff);
	// FirstCalls the envoys whose first call succeeded.
	FirstCalls, FirstCallErrors int
	FirstCallP50MS              float64
	FirstCallP99MS              float64
	// AllConnectedSeconds: from the first envoy's start to the last one's
	// first answer; the stagger alone spreads starts over one period.
	AllConnectedSeconds float64
	// Heartbeats during the measurement window.
	Heartbeats, HeartbeatErrors int
	HeartbeatP50MS              float64
	HeartbeatP99MS              float64
	HeartbeatMaxMS              float64
	// Heartbeats of envoys already up while others were still connecting
	// and registering: how many, how many failed (the call timeout), and
	// the p99 of those that did not.
	RampHeartbeats, RampHeartbeatErrors int
	RampHeartbeatP99MS                  float64
	// HeartbeatP99SliceMedianMS is the median over the window's
	// period-long slices of each slice's p99.
	HeartbeatP99SliceMedianMS  float64
	HeartbeatsPerSecond        float64
	WindowSeconds              float64
	ServerCPUPercent           float64 // % of one core, over the window
	ServerIdleRSSMiB           float64 // before the first connection
	ServerRSSMiB, ServerHWMMiB float64 // at the window's end; peak
	ServerRSSPerConnKiB        float64 // (RSS - idle RSS) / N
	ClientCPUPercent           float64 // the load generator, same window
	ClientRSSMiB               float64
	// From the director's log: registrations it committed (each a store
	// transaction; a retried attempt whose caller had given up still
	// counts) and envoys it marked offline.
	Registrations, Offline int      `json:",omitempty"`
	ClientGCs              uint32   // the generator's collections during the window
	ClientGCPauseMS        float64  // and their stop-the-world pauses
	FirstErrors            []string `json:",omitempty"`
}

func capacityMain(args []string) error {
	fs := flag.NewFlagSet("capacity", flag.ExitOnError)
	n := fs.Int("n", 1000, "simulated envoys, each with its own certificate and connection")
	period := fs.Duration("period", 10*time.Second, "heartbeat period; starts are staggered uniformly over one period")
	window := fs.Duration("window", 60*time.Second, "measurement window, after every envoy has registered")
	watch := fs.Bool("watch", true, "each envoy also holds its WatchAssignments stream open, as a real envoy does (baseline: a health Watch stream)")
	pkiDir := fs.String("pki", "bench/out/pki", "certificate cache: reused by later runs")
	workers := fs.Int("issue-workers", 0, "parallel certificate issuers (0: one per CPU)")
	out := fs.String("out", "", "write the result as JSON here")
	only := fs.String("only", "", "run only this server: director or raw (default both)")
	maxConnecting := fs.Int("max-connecting", 0, "at most this many first calls (TLS handshake + RegisterEnvoy/Check) in flight; 0: no limit. With no limit, more handshakes than the machine can finish within the call timeout make every one of them late and retried (overload collapse)")
	certsOnly := fs.Bool("certs-only", false, "only issue the missing certificates (timed), then stop")
	gogc := fs.Int("generator-gogc", 400, "GOGC of this load generator (not of the servers): fewer collections of its large heap of connections, so its pauses disturb the timings less")
	_ = fs.Parse(args)
	debug.SetGCPercent(*gogc)
	if *n < 1 || *period <= 0 || *window <= 0 {
		return errors.New("-n, -period and -window must be positive")
	}
	need := uint64(*n) + 256
	if got, err := raiseNoFile(need); err != nil {
		return err
	} else {
		fmt.Printf("RLIMIT_NOFILE %d (need %d)\n", got, need)
	}
	res := &capacityResult{N: *n, Period: period.String(), Window: window.String(), Watch: *watch, MaxConnecting: *maxConnecting, Start: time.Now().UTC()}
	if b, err := exec.Command("uptime").Output(); err == nil {
		res.Uptime = strings.TrimSpace(string(b))
	}

	fmt.Printf("certificates: %d envoys in %s\n", *n, *pkiDir)
	p, err := openBenchPKI(*pkiDir)
	if err != nil {
		return err
	}
	st, err := p.envoys(*n, *workers)
	res.Certificates = st
	if err != nil {
		return err
	}
	fmt.Printf("certificates: %d issued in %.1fs (%.2f ms each, %d workers), %d reused\n", st.Issued, st.Seconds, st.PerCertMS, st.Workers, st.Reused)
	if *certsOnly {
		return nil
	}

	// One keyring per envoy, loaded once for both servers.
	t0 := time.Now()
	keyrings := make([]*pki.Keyring, *n)
	for i := range keyrings {
		f := p.envoyFiles(i + 1)
		if keyrings[i], err = pki.NewKeyring(pki.KeyringConfig{Files: f}); err != nil {
			return fmt.Errorf("%s: %w", envoyName(i+1), err)
		}
	}
	fmt.Printf("keyrings: %d loaded in %.1fs\n", *n, time.Since(t0).Seconds())

	cfg := sideConfig{n: *n, period: *period, window: *window, watch: *watch, pki: p, keyrings: keyrings, nofile: need, maxConnecting: *maxConnecting}
	// The baseline first, then the director, each alone on the machine.
	if *only == "" || *only == "raw" {
		if res.Raw, err = runSide(cfg, "raw"); err != nil {
			return fmt.Errorf("baseline: %w", err)
		}
	}
	if *only == "" || *only == "director" {
		if res.Director, err = runSide(cfg, "director"); err != nil {
			return fmt.Errorf("director: %w", err)
		}
	}
	if res.Raw != nil && res.Director != nil {
		res.HeartbeatP50Ratio = res.Director.HeartbeatP50MS / res.Raw.HeartbeatP50MS
		res.HeartbeatP99Ratio = res.Director.HeartbeatP99MS / res.Raw.HeartbeatP99MS
		res.HeartbeatP99SliceMedianRatio = res.Director.HeartbeatP99SliceMedianMS / res.Raw.HeartbeatP99SliceMedianMS
		res.ServerCPURatio = res.Director.ServerCPUPercent / res.Raw.ServerCPUPercent
		res.ServerRSSRatio = res.Director.ServerRSSMiB / res.Raw.ServerRSSMiB
	}
	printCapacity(os.Stdout, res)
	if *out != "" {
		if err := atomicfile.ReplaceJSON(*out, res); err != nil {
			return err
		}
	}
	for _, s := range []*sideResult{res.Raw, res.Director} {
		if s != nil && (s.FirstCalls < res.N || s.HeartbeatErrors > 0) {
			return fmt.Errorf("%s: %d of %d envoys up, %d heartbeat errors (first errors: %v)", s.Server, s.FirstCalls, res.N, s.HeartbeatErrors, s.FirstErrors)
		}
	}
	return nil
}

func printCapacity(w io.Writer, r *capacityResult) {
	fmt.Fprintf(w, "\ncapacity: N=%d envoys, heartbeat period %s, window %s, watch streams %v, max connecting %d\n", r.N, r.Period, r.Window, r.Watch, r.MaxConnecting)
	fmt.Fprintf(w, "%-9s %10s %10s %10s %9s %9s %9s %10s %10s %9s\n", "server", "hb_p50_ms", "hb_p99_ms", "hb_max_ms", "hb/s", "cpu_%", "rss_MiB", "hwm_MiB", "conn_p99", "all_up_s")
	for _, s := range []*sideResult{r.Raw, r.Director} {
		if s == nil {
			continue
		}
		fmt.Fprintf(w, "%-9s %10.2f %10.2f %10.1f %9.1f %9.1f %9.1f %10.1f %10.1f %9.1f\n", s.Server, s.HeartbeatP50MS, s.HeartbeatP99MS, s.HeartbeatMaxMS,
			s.HeartbeatsPerSecond, s.ServerCPUPercent, s.ServerRSSMiB, s.ServerHWMMiB, s.FirstCallP99MS, s.AllConnectedSeconds)
	}
	if r.Raw != nil && r.Director != nil {
		fmt.Fprintf(w, "director/raw: heartbeat p50 %.2f×, p99 %.2f× (median of per-period p99s %.2f×), CPU %.2f×, RSS %.2f×\n", r.HeartbeatP50Ratio, r.HeartbeatP99Ratio, r.HeartbeatP99SliceMedianRatio, r.ServerCPURatio, r.ServerRSSRatio)
	}
}

type sideConfig struct {
	n              int
	period, window time.Duration
	watch          bool
	pki            *benchPKI
	keyrings       []*pki.Keyring
	nofile         uint64
	maxConnecting  int
}

// child is a server process under measurement.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	addr  string
}

func startChild(cfg sideConfig, mode, work string) (*child, error) {
	cmd := exec.Command(os.Args[0], "serve", "-mode", mode, "-pki", cfg.pki.dir,
		"-data", filepath.Join(work, "data"), "-log", filepath.Join(work, "director.log"),
		"-period", cfg.period.String(), "-nofile", fmt.Sprint(cfg.nofile))
	stderr, err := os.Create(filepath.Join(work, "stderr.log"))
	if err != nil {
		return nil, err
	}
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, stdin: stdin}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "LISTEN "); ok {
				lines <- a
			}
		}
		close(lines)
	}()
	select {
	case a, ok := <-lines:
		if !ok {
			_ = cmd.Wait()
			b, _ := os.ReadFile(stderr.Name())
			return nil, fmt.Errorf("server exited before listening: %s", b)
		}
		c.addr = a
	case <-time.After(60 * time.Second):
		c.stop()
		return nil, errors.New("server did not listen within 60s")
	}
	return c, nil
}

// stop closes the child's stdin (its signal to stop), then SIGTERM, then
// SIGKILL, each after a bounded wait.
func (c *child) stop() {
	done := make(chan struct{})
	go func() { _ = c.cmd.Wait(); close(done) }()
	_ = c.stdin.Close()
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		select {
		case <-done:
			return
		case <-time.After(15 * time.Second):
			_ = c.cmd.Process.Signal(sig)
		}
	}
	<-done
}

// envoyShard is what each simulated envoy registers: a Fashion-MNIST-like
// shard description.
func envoyShard(i int) *fxv1.DatasetShard {
	return &fxv1.DatasetShard{
		Description: fmt.Sprintf("simulated shard %d", i), Tags: []string{"bench", "fashion-mnist"},
		SampleShape: []int64{28, 28}, TrainSamples: 600, ValidSamples: 100, Classes: 10,
		Devices: []*fxv1.Device{{Kind: "cpu", Name: "0"}},
	}
}

const callTimeout = 15 * time.Second // envoy.DefaultRPCTimeout

func runSide(cfg sideConfig, mode string) (*sideResult, error) {
	name := map[string]string{"raw": "raw-grpc", "director": "director"}[mode]
	fmt.Printf("\n== %s: %d envoys ==\n", name, cfg.n)
	work, err := os.MkdirTemp("", "fxbench-"+mode+"-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	c, err := startChild(cfg, mode, work)
	if err != nil {
		return nil, err
	}
	defer c.stop()
	pid := c.cmd.Process.Pid
	time.Sleep(500 * time.Millisecond)
	idle, _, _ := procMem(pid)
	res := &sideResult{Server: name, ServerIdleRSSMiB: mib(idle)}
	fmt.Printf("%s: pid %d listening on %s, idle RSS %.1f MiB\n", name, pid, c.addr, mib(idle))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		windowStart atomic.Int64 // unix nanos; 0 until every envoy is up
		windowEnd   atomic.Int64
		mu          sync.Mutex
		firstLat    []float64
		hbLat       []float64
		hbSlot      []int // which period-long slice of the window each heartbeat fell in
		rampLat     []float64
		rampHB      int
		rampErrs    int
		firstErrs   int
		hbErrs      int
		errSamples  []string
		up          sync.WaitGroup
		all         sync.WaitGroup
		lastUp      atomic.Int64
	)
	noteErr := func(what string, err error, counter *int) {
		mu.Lock()
		defer mu.Unlock()
		*counter++
		if len(errSamples) < 5 {
			errSamples = append(errSamples, what+": "+err.Error())
		}
	}
	conns := make([]*grpc.ClientConn, cfg.n)
	defer func() {
		for _, cc := range conns {
			if cc != nil {
				cc.Close()
			}
		}
	}()
	start := time.Now()
	upBound := cfg.period + 10*time.Minute
	upDeadline := start.Add(upBound)
	// At most cfg.maxConnecting first calls (handshake + registration) in
	// flight, when set.
	var connecting chan struct{}
	if cfg.maxConnecting > 0 {
		connecting = make(chan struct{}, cfg.maxConnecting)
	}
	up.Add(cfg.n)
	for i := range cfg.n {
		offset := time.Duration(int64(cfg.period) * int64(i) / int64(cfg.n))
		envoy := envoyName(i + 1)
		cc, err := pki.NewClient(c.addr, cfg.keyrings[i], "localhost")
		if err != nil {
			return nil, err
		}
		conns[i] = cc
		all.Go(func() {
			first := true
			defer func() {
				if first {
					up.Done()
				}
			}()
			if !sleepUntil(ctx, start.Add(offset)) {
				return
			}
			dc := fxv1.NewDirectorClient(cc)
			hc := healthpb.NewHealthClient(cc)
			// The first call connects (TCP + TLS handshake) and registers.
			// On failure it retries as a real envoy does: exponential
			// backoff from 0.5s to 30s (envoy.DefaultRetryInitial/Max),
			// bounded by the run's deadline.
			var err error
			backoff := 500 * time.Millisecond
			for {
				if connecting != nil {
					select {
					case connecting <- struct{}{}:
					case <-ctx.Done():
						return
					}
				}
				t := time.Now()
				cctx, ccancel := context.WithTimeout(ctx, callTimeout)
				if mode == "director" {
					_, err = dc.RegisterEnvoy(cctx, &fxv1.RegisterEnvoyRequest{EnvoyName: envoy, Shard: envoyShard(i + 1), MaxExperiments: 1, Version: "bench"})
				} else {
					_, err = hc.Check(cctx, &healthpb.HealthCheckRequest{})
				}
				ccancel()
				if connecting != nil {
					<-connecting
				}
				if err == nil {
					ms := float64(time.Since(t)) / 1e6
					mu.Lock()
					firstLat = append(firstLat, ms)
					mu.Unlock()
					break
				}
				noteErr(envoy+" first call", err, &firstErrs)
				if time.Now().Add(backoff).After(upDeadline) || !sleepUntil(ctx, time.Now().Add(backoff)) {
					return
				}
				backoff = min(2*backoff, 30*time.Second)
			}
			if err != nil {
				return
			}
			if cfg.watch {
				all.Go(func() { holdStream(ctx, mode, dc, hc, envoy) })
			}
			lastUp.Store(time.Now().UnixNano())
			first = false
			up.Done()
			// Heartbeat every period from the envoy's start offset.
			for k := 1; ; k++ {
				at := start.Add(offset + time.Duration(k)*cfg.period)
				if at.Before(time.Now()) {
					continue // a slot missed while registering: no catch-up burst
				}
				if end := windowEnd.Load(); end != 0 && at.UnixNano() >= end {
					return
				}
				if !sleepUntil(ctx, at) {
					return
				}
				t := time.Now()
				cctx, ccancel := context.WithTimeout(ctx, callTimeout)
				var err error
				if mode == "director" {
					_, err = dc.Heartbeat(cctx, &fxv1.HeartbeatRequest{EnvoyName: envoy})
				} else {
					_, err = hc.Check(cctx, &healthpb.HealthCheckRequest{})
				}
				ccancel()
				ms := float64(time.Since(t)) / 1e6
				ws, we := windowStart.Load(), windowEnd.Load()
				if ws == 0 {
					// Before the window: while other envoys connect.
					mu.Lock()
					rampHB++
					if err != nil {
						rampErrs++
					} else {
						rampLat = append(rampLat, ms)
					}
					mu.Unlock()
					continue
				}
				if t.UnixNano() < ws || t.UnixNano() >= we {
					continue
				}
				if err != nil {
					if ctx.Err() == nil {
						noteErr(envoy+" heartbeat", err, &hbErrs)
					}
					continue
				}
				mu.Lock()
				hbLat = append(hbLat, ms)
				hbSlot = append(hbSlot, int((t.UnixNano()-ws)/int64(cfg.period)))
				mu.Unlock()
			}
		})
	}
	// Wait for every envoy's first call, bounded.
	upDone := make(chan struct{})
	go func() { up.Wait(); close(upDone) }()
	select {
	case <-upDone:
	case <-time.After(time.Until(upDeadline) + callTimeout):
		fmt.Printf("%s: not every envoy was up after %s; measuring anyway\n", name, upBound)
	}
	res.AllConnectedSeconds = float64(lastUp.Load()-start.UnixNano()) / 1e9
	mu.Lock()
	res.FirstCalls = len(firstLat)
	res.FirstCallErrors = firstErrs
	res.FirstCallP50MS, res.FirstCallP99MS = pct(firstLat, 0.50), pct(firstLat, 0.99)
	mu.Unlock()
	fmt.Printf("%s: %d envoys up after %.1fs (first call incl. handshake p50 %.1f ms, p99 %.1f ms, %d errors)\n",
		name, res.FirstCalls, res.AllConnectedSeconds, res.FirstCallP50MS, res.FirstCallP99MS, res.FirstCallErrors)

	// Let one whole period pass so every envoy is in its heartbeat rhythm,
	// then measure.
	time.Sleep(cfg.period)
	ws := time.Now()
	windowEnd.Store(ws.Add(cfg.window).UnixNano())
	windowStart.Store(ws.UnixNano())
	cpu0, _ := procCPU(pid)
	self0, _ := procCPU(0)
	var gc0, gc1 runtime.MemStats
	runtime.ReadMemStats(&gc0)
	time.Sleep(cfg.window)
	cpu1, _ := procCPU(pid)
	self1, _ := procCPU(0)
	runtime.ReadMemStats(&gc1)
	res.ClientGCs = gc1.NumGC - gc0.NumGC
	res.ClientGCPauseMS = float64(gc1.PauseTotalNs-gc0.PauseTotalNs) / 1e6
	secs := time.Since(ws).Seconds()
	rss, hwm, err := procMem(pid)
	if err != nil {
		return nil, err
	}
	selfRSS, _, _ := procMem(0)
	// Let the window's last calls finish.
	time.Sleep(min(callTimeout, cfg.period))
	cancel()
	all.Wait()

	mu.Lock()
	defer mu.Unlock()
	res.WindowSeconds = secs
	res.Heartbeats, res.HeartbeatErrors = len(hbLat), hbErrs
	res.HeartbeatP50MS, res.HeartbeatP99MS, res.HeartbeatMaxMS = pct(hbLat, 0.50), pct(hbLat, 0.99), pct(hbLat, 1)
	res.HeartbeatsPerSecond = float64(len(hbLat)) / secs
	res.RampHeartbeats, res.RampHeartbeatErrors, res.RampHeartbeatP99MS = rampHB, rampErrs, pct(rampLat, 0.99)
	// The p99 of each period-long slice of the window, and their median: a
	// figure that a few seconds of another process hogging the shared
	// cores does not decide.
	slots := map[int][]float64{}
	for i, v := range hbLat {
		slots[hbSlot[i]] = append(slots[hbSlot[i]], v)
	}
	var p99s []float64
	for _, v := range slots {
		p99s = append(p99s, pct(v, 0.99))
	}
	res.HeartbeatP99SliceMedianMS = pct(p99s, 0.5)
	res.ServerCPUPercent = (cpu1 - cpu0) / secs * 100
	res.ClientCPUPercent = (self1 - self0) / secs * 100
	res.ServerRSSMiB, res.ServerHWMMiB = mib(rss), mib(hwm)
	res.ServerRSSPerConnKiB = float64(rss-min(rss, idle)) / float64(cfg.n) / 1024
	res.ClientRSSMiB = mib(selfRSS)
	res.FirstErrors = errSamples
	if mode == "director" {
		res.Registrations, res.Offline = directorLogCounts(filepath.Join(work, "director.log"))
	}
	fmt.Printf("%s: while envoys were connecting: %d heartbeats, %d failed, p99 of the others %.1f ms\n", name, res.RampHeartbeats, res.RampHeartbeatErrors, res.RampHeartbeatP99MS)
	if mode == "director" {
		fmt.Printf("%s: committed %d registrations for %d envoys; marked envoys offline %d times\n", name, res.Registrations, cfg.n, res.Offline)
	}
	fmt.Printf("%s: %d heartbeats in %.0fs: p50 %.2f ms, p99 %.2f ms, max %.1f ms, %d errors (median of per-period p99s %.2f ms); server CPU %.1f%% of a core, RSS %.1f MiB (peak %.1f, %.1f KiB/envoy); generator CPU %.1f%%, RSS %.0f MiB, %d GCs (%.1f ms of pauses)\n",
		name, res.Heartbeats, secs, res.HeartbeatP50MS, res.HeartbeatP99MS, res.HeartbeatMaxMS, res.HeartbeatErrors, res.HeartbeatP99SliceMedianMS,
		res.ServerCPUPercent, res.ServerRSSMiB, res.ServerHWMMiB, res.ServerRSSPerConnKiB, res.ClientCPUPercent, res.ClientRSSMiB, res.ClientGCs, res.ClientGCPauseMS)
	return res, nil
}

// directorLogCounts counts the director's "envoy registered", "envoy
// re-registered" and "envoy offline" log lines.
func directorLogCounts(path string) (registrations, offline int) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := sc.Text()
		switch {
		case strings.Contains(l, "envoy registered:"), strings.Contains(l, "envoy re-registered:"):
			registrations++
		case strings.Contains(l, "envoy offline:"):
			offline++
		}
	}
	return registrations, offline
}

// holdStream keeps the envoy's long-lived stream open until ctx ends, as a
// real envoy keeps WatchAssignments open (the baseline: a health Watch).
func holdStream(ctx context.Context, mode string, dc fxv1.DirectorClient, hc healthpb.HealthClient, envoy string) {
	var recv func() error
	if mode == "director" {
		s, err := dc.WatchAssignments(ctx, &fxv1.WatchAssignmentsRequest{EnvoyName: envoy})
		if err != nil {
			return
		}
		recv = func() error { _, err := s.Recv(); return err }
	} else {
		s, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			return
		}
		recv = func() error { _, err := s.Recv(); return err }
	}
	for {
		if err := recv(); err != nil {
			if ctx.Err() == nil && status.Code(err) != codes.Canceled {
				fmt.Fprintf(os.Stderr, "%s: stream ended: %v\n", envoy, err)
			}
			return
		}
	}
}

func sleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-tm.C:
		return true
	}
}

// pct is the q-quantile (nearest rank) of v; q = 1 is the maximum.
func pct(v []float64, q float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.5) - 1
	return s[max(0, min(len(s)-1, i))]
}
