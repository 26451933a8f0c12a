// Package director is the long-lived service of a federation: it registers
// envoys and tracks their liveness, takes experiments from researchers
// (streamed to disk, checked, recorded), has admins or its policy review
// them, offers them to the envoys their plans select, starts an aggregator
// for each experiment enough envoys accepted, and serves progress, metrics
// and models back to researchers.
//
// All state that must survive a restart is in a store.Store (bbolt in
// DataDir, or a PostgreSQL database) plus the archive and aggregator files
// under DataDir; everything
// else (liveness, metric events, live progress) is rebuilt from them, so a
// director killed at any point comes back with every experiment in its
// state and running ones resumed from their last completed round.
//
// Concurrency: one mutex guards the in-memory state. Store writes happen
// under it, so the store and memory never disagree; aggregators are called
// (Drop) only outside it, because they call back into the director through
// their Sink.
package director

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fx-fl/fx/internal/telemetry"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/protobuf/proto"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// Director is the federation's coordinator. Make one with New and serve it
// with Run.
type Director struct {
	cfg   Config
	log   hclog.Logger
	store store.Store
	clock Clock
	// elector is the store's, when several directors share it: then Run
	// stands by until it leads (see leader.go), and only then loads the
	// state.
	elector store.Elector
	// leading opens the Director service to callers (see gate).
	leading atomic.Bool

	// registering orders the registrations of each envoy; see
	// registerEnvoy. Taken before mu.
	registering [64]sync.Mutex

	mu       sync.Mutex
	exps     map[string]*expState
	envoys   map[string]*envoyState
	reserved map[string]bool // owner/name of uploads in progress
	uploads  map[string]int  // uploads in progress by owner
	// runCtx parents every aggregator; nil until Run starts them.
	runCtx  context.Context
	runs    sync.WaitGroup
	stopped bool // Run is shutting down: aggregators stop but stay RUNNING
	serving bool // Run serves the Director service
	// standby, while this director does not lead, says why and who does.
	standby string

	// metrics, if not nil, are what the director and its aggregators
	// record (see internal/telemetry).
	metrics *telemetry.Metrics

	addrMu sync.Mutex
	addr   net.Addr
	ready  chan struct{}
	// shutdown is closed when Run starts stopping, to end streams that
	// would otherwise wait for events (WatchMetrics) until the hard stop.
	shutdown chan struct{}
}

// New opens (or creates) the director's state in cfg.DataDir and loads it:
// experiments, participants, envoys, and each experiment's metric log from
// its aggregator's files. Nothing is served or launched until Run.
func New(cfg Config) (*Director, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("director: %w", err)
	}
	for _, dir := range []string{cfg.DataDir, filepath.Join(cfg.DataDir, "experiments"), filepath.Join(cfg.DataDir, "tmp")} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("director: data_dir: %w", err)
		}
	}
	st := cfg.Store
	if st == nil {
		opened, err := openStore(cfg)
		if err != nil {
			return nil, fmt.Errorf("director: %w", err)
		}
		st = opened
	}
	elector, _ := backing(st).(store.Elector)
	// Uploads interrupted by a crash are never resumed; their bytes are
	// junk. A standby leaves them to the leader, which may be receiving
	// them: it clears them when it takes the lead (campaign).
	if elector == nil {
		if err := clearDir(filepath.Join(cfg.DataDir, "tmp")); err != nil {
			if cfg.Store == nil {
				_ = st.Close()
			}
			return nil, fmt.Errorf("director: data_dir: %w", err)
		}
	}
	metrics := cfg.Metrics
	if metrics == nil && (cfg.MetricsListen != "" || cfg.MetricsListener != nil) {
		metrics = telemetry.New(cfg.Version, telemetry.RoleDirector)
	}
	if metrics != nil {
		st = timedStore{Store: st, m: metrics}
	}
	d := &Director{
		cfg:      cfg,
		log:      cfg.Logger.Named("director"),
		store:    st,
		elector:  elector,
		metrics:  metrics,
		clock:    cfg.Clock,
		exps:     map[string]*expState{},
		envoys:   map[string]*envoyState{},
		reserved: map[string]bool{},
		uploads:  map[string]int{},
		ready:    make(chan struct{}),
		shutdown: make(chan struct{}),
	}
	// A director that must win an election first loads the state then
	// (campaign): what the store holds now may change before.
	if elector == nil {
		if err := d.load(); err != nil {
			if cfg.Store == nil {
				_ = st.Close()
			}
			return nil, fmt.Errorf("director: load state: %w", err)
		}
		if err := d.checkStoreMatches(); err != nil {
			if cfg.Store == nil {
				_ = st.Close()
			}
			return nil, fmt.Errorf("director: %w", err)
		}
		// A copy of the store as it loaded: recovery always has one to go back to.
		d.snapshot()
	}
	d.registerGauges()
	return d, nil
}

func clearDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// load rebuilds the in-memory state from the store and the aggregator files.
func (d *Director) load() error {
	var exps []*store.Experiment
	parts := map[string][]*store.Participant{}
	positions := map[string]store.MetricPosition{}
	var envoys []*store.Envoy
	err := d.store.View(func(tx store.Tx) error {
		var err error
		if exps, err = tx.Experiments(); err != nil {
			return err
		}
		for _, e := range exps {
			if parts[e.ID], err = tx.Participants(e.ID); err != nil {
				return err
			}
			if positions[e.ID], err = tx.MetricPosition(e.ID); err != nil {
				return err
			}
		}
		envoys, err = tx.Envoys()
		return err
	})
	if err != nil {
		return err
	}
	// Records written before the protocol bounded reasons and descriptions
	// are clipped as they load, so that an old oversized one cannot break
	// a listing; the next write stores the clipped value.
	for _, rec := range envoys {
		shard := &fxv1.DatasetShard{}
		if err := proto.Unmarshal(rec.Shard, shard); err != nil {
			return fmt.Errorf("envoy %s: corrupt shard: %w", rec.Name, err)
		}
		shard.Description = fxv1.Clip(shard.GetDescription(), fxv1.MaxDescriptionBytes())
		d.envoys[rec.Name] = &envoyState{rec: *rec, shard: shard, streams: map[*assignStream]struct{}{}}
	}
	for _, rec := range exps {
		plan, err := experiment.ParseStoredPlan([]byte(rec.PlanYAML))
		if err != nil {
			return fmt.Errorf("experiment %s: stored plan: %w", rec.ID, err)
		}
		rec.Reason = clipReason(rec.Reason)
		e := newExpState(*rec, plan)
		for _, p := range parts[rec.ID] {
			p.Reason = clipReason(p.Reason)
			e.parts[p.Envoy] = p
		}
		if err := d.rebuildMetrics(e, positions[rec.ID]); err != nil {
			d.log.Error("round files that cannot be read are left out of the metric log", "experiment", rec.ID, "error", err)
		}
		d.exps[rec.ID] = e
	}
	d.log.Info("state loaded", "experiments", len(d.exps), "envoys", len(d.envoys))
	return nil
}

// rebuildMetrics fills an experiment's metric log from its aggregator's
// round files: the log is a pure function of those files, so rebuilding it
// after a restart yields exactly the events (and sequence numbers) watchers
// saw before.
func (d *Director) rebuildMetrics(e *expState, pos store.MetricPosition) error {
	dir := d.aggregatorDir(e.rec.ID)
	if !fileExists(dir) {
		return nil
	}
	// A damaged round file is left out (and named in err); the rounds
	// that can be read still make the log.
	summaries, best, err := d.cfg.Launcher.History(dir)
	for _, s := range summaries {
		e.metrics.add(s, roundTime(dir, s.Round), e.plan)
		// A round whose files became durable after the last director
		// recorded anything (it died between the aggregator's checkpoint
		// and the report) completed all the same: say so once, here.
		if s.Round > pos.Round {
			d.log.Info("round completed", "experiment", e.rec.ID, "round", s.Round, "reported", len(s.Reported), "missing", len(s.Missing), "learned_from", "its files, at load")
		}
	}
	e.metrics.best = best
	switch {
	case e.metrics.round() < pos.Round:
		d.log.Warn("the aggregator directory has fewer rounds than the store recorded", "experiment", e.rec.ID, "files", e.metrics.round(), "recorded", pos.Round)
	case e.metrics.round() > pos.Round:
		d.recordMetricPosition(e.rec.ID, e.metrics)
	}
	return err
}

// recordMetricPosition stores how far an experiment's metric log reaches,
// so that the next load knows which rounds no director has recorded.
func (d *Director) recordMetricPosition(id string, m *metricLog) {
	pos := store.MetricPosition{Round: m.round(), Sequence: int64(len(m.events))}
	if err := d.store.Update(func(tx store.Tx) error { return tx.PutMetricPosition(id, pos) }); err != nil {
		d.log.Error("cannot record metric position", "experiment", id, "error", err)
	}
}

func roundTime(dir string, round int) time.Time {
	fi, err := os.Stat(aggregator.RoundPath(dir, round))
	if err != nil {
		return time.Time{}
	}
	return fi.ModTime().UTC()
}

func (d *Director) experimentDir(id string) string {
	return filepath.Join(d.cfg.DataDir, "experiments", id)
}
func (d *Director) archivePath(id string) string {
	return filepath.Join(d.experimentDir(id), "archive")
}
func (d *Director) aggregatorDir(id string) string {
	return filepath.Join(d.experimentDir(id), "aggregator")
}

// Addr is the address the director serves on, once Run has bound it.
func (d *Director) Addr() net.Addr {
	<-d.ready
	d.addrMu.Lock()
	defer d.addrMu.Unlock()
	return d.addr
}

// Run serves the Director service (with gRPC health and reflection),
// relaunches the aggregators of RUNNING experiments, offers queued ones,
// and checks deadlines and liveness, until ctx is cancelled. It then stops
// the server gracefully (hard after StopTimeout), stops the aggregators
// (their experiments stay RUNNING and resume at the next start) and closes
// the store.
func (d *Director) Run(ctx context.Context) error {
	defer func() {
		if d.cfg.Store == nil {
			_ = d.store.Close()
		}
	}()
	lis := d.cfg.Listener
	if lis == nil {
		if d.cfg.ListenAddress == "" {
			close(d.ready)
			return errors.New("director: listen_address is required")
		}
		var err error
		if lis, err = net.Listen("tcp", d.cfg.ListenAddress); err != nil {
			close(d.ready)
			return fmt.Errorf("director: listen_address: %w", err)
		}
	}
	metricsLis := d.cfg.MetricsListener
	if metricsLis == nil && d.cfg.MetricsListen != "" {
		var err error
		if metricsLis, err = net.Listen("tcp", d.cfg.MetricsListen); err != nil {
			lis.Close()
			close(d.ready)
			return fmt.Errorf("director: metrics.listen: %w", err)
		}
	}
	d.addrMu.Lock()
	d.addr = lis.Addr()
	d.addrMu.Unlock()
	close(d.ready)
	if metricsLis != nil {
		// Serves until Run returns, so that /readyz says "stopping" while
		// the director drains.
		telemetryCtx, stopTelemetry := context.WithCancel(context.Background())
		telemetryDone := make(chan error, 1)
		go func() {
			telemetryDone <- telemetry.Server{Metrics: d.metrics, Ready: d.readiness, Logger: d.log}.Serve(telemetryCtx, metricsLis)
		}()
		defer func() {
			stopTelemetry()
			if err := <-telemetryDone; err != nil {
				d.log.Warn("metrics listener", "error", err)
			}
		}()
	}

	srv := grpc.NewServer(append(append(slices.Clone(d.cfg.ServerOptions), keepaliveOptions()...), d.gateOptions()...)...)
	fxv1.RegisterDirectorServer(srv, &service{d: d})
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	reflection.Register(srv)

	serveErr := make(chan error, 1)
	serve := func() { go func() { serveErr <- srv.Serve(lis) }() }
	// lost is closed when an elected director loses the lead; never
	// otherwise.
	var lost <-chan struct{}
	var lead *store.Leadership
	if d.elector != nil {
		// A standby serves from the start, refusing calls with the
		// leader's address.
		serve()
		var err error
		lead, err = d.campaign(ctx, d.elector, hs, lis.Addr())
		if lead == nil {
			hs.Shutdown()
			stopGRPC(srv, d.cfg.StopTimeout)
			return err
		}
		lost = lead.Lost()
	}
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus(fxv1.Director_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)

	runCtx, cancelRuns := context.WithCancel(context.Background())
	defer cancelRuns()
	d.start(runCtx)

	d.leading.Store(true)
	if d.elector == nil {
		serve()
	}
	d.mu.Lock()
	d.serving = true
	d.standby = ""
	d.mu.Unlock()
	// The loops end with ctx, or when the lead is lost.
	loopCtx, stopLoops := context.WithCancel(ctx)
	defer stopLoops()
	sweepDone := make(chan struct{})
	go func() { defer close(sweepDone); d.sweepLoop(loopCtx) }()
	snapshotsDone := make(chan struct{})
	go func() { defer close(snapshotsDone); d.snapshotLoop(loopCtx) }()
	d.log.Info("director serving", "address", lis.Addr().String(), "version", d.cfg.Version)

	var err error
	select {
	case <-ctx.Done():
	case err = <-serveErr:
		err = fmt.Errorf("director: serve: %w", err)
	case <-lost:
		// Its aggregators stop below; the new leader resumes them.
		err = fmt.Errorf("director: %w; stopping, with the experiments left to the new leader (run this director again, under a supervisor that restarts it, to stand by)", lead.Err())
		d.log.Error("lost the lead", "error", lead.Err())
	}
	stopLoops()
	d.leading.Store(false)
	d.setStandby("this director is stopping")
	hs.Shutdown()
	d.mu.Lock()
	d.stopped = true
	d.closeStreamsLocked()
	close(d.shutdown)
	d.mu.Unlock()
	stopGRPC(srv, d.cfg.StopTimeout)
	// Cancelled aggregators stop without telling collaborators to quit:
	// their experiments stay RUNNING and resume at the next start.
	cancelRuns()
	d.runs.Wait()
	<-sweepDone
	<-snapshotsDone
	d.snapshot()
	d.log.Info("director stopped")
	return err
}

// keepaliveOptions let the director notice a peer that vanished without
// closing its connection (a site whose network dropped): an idle
// connection is pinged every minute and closed when a ping goes
// unanswered, so an envoy's assignment stream does not linger for the
// operating system's TCP timeout. Clients may ping as often as every 10s.
func keepaliveOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: time.Minute, Timeout: 20 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	}
}

// stopGRPC stops gracefully, then hard after timeout: a client holding a
// stream open must not keep the director from stopping.
func stopGRPC(srv *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() { srv.GracefulStop(); close(done) }()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		srv.Stop()
		<-done
	}
}

// start relaunches RUNNING and PAUSED experiments and fills free slots
// from the queue. A PAUSED one runs again: its aggregator pauses it anew
// if what paused it is still there.
func (d *Director) start(runCtx context.Context) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.runCtx = runCtx
	for _, e := range d.sortedExps() {
		if e.rec.State == fxv1.ExperimentState_PAUSED {
			d.setPausedLocked(e, "")
		}
		if e.rec.State == fxv1.ExperimentState_RUNNING {
			d.launchLocked(e)
		}
	}
	d.scheduleLocked()
}

func (d *Director) sweepLoop(ctx context.Context) { d.every(ctx, d.cfg.SweepPeriod, d.sweep) }

// every calls f every period of the director's clock until ctx ends.
func (d *Director) every(ctx context.Context, period time.Duration, f func()) {
	t := d.clock.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
			f()
		}
	}
}

// sweep starts or fails offers whose time has come and notes envoys going
// offline.
func (d *Director) sweep() {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.clock.Now()
	for _, env := range d.envoys {
		online := d.onlineLocked(env, now)
		if env.wasOnline && !online {
			d.log.Warn("envoy offline", "envoy", env.rec.Name, "last_seen", env.lastSeen)
		}
		env.wasOnline = online
	}
	d.sweepOffersLocked(now)
}
