package envoy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/fx-fl/fx/internal/directors"
	"github.com/fx-fl/fx/internal/telemetry"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/pki"
	"github.com/fx-fl/fx/privacy"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner/sandbox"
)

// Envoy is a data site's agent. It is made by New and runs until the context
// given to Run ends.
type Envoy struct {
	cfg    Config
	log    hclog.Logger
	name   string
	creds  Credentials
	data   *dataset.Dataset
	shard  *fxv1.DatasetShard
	conn   *grpc.ClientConn
	client fxv1.DirectorClient

	newRunner RunnerFactory
	runCollab CollaboratorFunc
	// metrics, when the envoy has a metrics listener, receive what its
	// collaborators and runners do (see internal/telemetry).
	metrics *telemetry.Metrics
	// sandboxErr is why exec runners are refused here (they should be
	// sandboxed and cannot be), or nil.
	sandboxErr error
	// ledger is the site's privacy ledger (see privacy.go).
	ledger *privacy.Ledger

	// runCtx is Run's context; every experiment goroutine derives from it.
	runCtx context.Context
	wg     sync.WaitGroup

	mu   sync.Mutex
	exps map[string]*exp
	// link is the last connection state logged, so that a state change is
	// logged once and not once per retry.
	link linkState
}

type linkState int

const (
	linkUnknown linkState = iota
	linkUp
	linkDown
)

// New checks the configuration, the certificate and the data, and prepares
// the work directory. It does not contact the director: that is Run's job,
// and Run keeps trying while the director is away.
func New(cfg Config) (*Envoy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	src := cfg.Credentials
	if src == nil {
		src = KeyringCredentials(pki.Files{Cert: cfg.TLS.Cert, Key: cfg.TLS.Key, CA: cfg.TLS.CA, CRL: cfg.TLS.CRL}, log.Named("tls"))
	}
	creds, err := src()
	if err != nil {
		return nil, fmt.Errorf("envoy credentials: %w", err)
	}
	name, err := checkIdentity(creds.Certificate, cfg.Name)
	if err != nil {
		return nil, fmt.Errorf("envoy certificate: %w", err)
	}
	if err := experiment.ValidateName("envoy", name); err != nil {
		return nil, fmt.Errorf("envoy certificate: CN: %w", err)
	}
	data, err := dataset.Load(cfg.Shard)
	if err != nil {
		return nil, fmt.Errorf("shard: loading the site's data: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(cfg.WorkDir, "experiments"), 0o700); err != nil {
		return nil, fmt.Errorf("work_dir: %w", err)
	}
	ledger, err := openLedger(cfg.WorkDir)
	if err != nil {
		return nil, err
	}
	var conn *grpc.ClientConn
	target, directorOpts, err := directors.Dial(cfg.Director.Address)
	if err == nil {
		conn, err = grpc.NewClient(target, append(dialOptions(creds, cfg.Retry, cfg.directorServerName()), directorOpts...)...)
	}
	if err != nil {
		ledger.Close()
		return nil, fmt.Errorf("director.address %q: %w", cfg.Director.Address, err)
	}
	e := &Envoy{
		cfg:       cfg,
		log:       log.Named("envoy").With("envoy", name),
		name:      name,
		creds:     creds,
		data:      data,
		shard:     describeShard(data, cfg.Tags),
		conn:      conn,
		client:    fxv1.NewDirectorClient(conn),
		newRunner: cfg.NewRunner,
		runCollab: cfg.RunCollaborator,
		ledger:    ledger,
		exps:      map[string]*exp{},
	}
	if cfg.Metrics.Listen != "" || cfg.Metrics.Listener != nil {
		e.metrics = telemetry.New(cfg.Version, telemetry.RoleEnvoy)
		e.registerGauges()
	}
	if e.newRunner == nil {
		e.newRunner = DefaultRunner
	}
	e.sandboxErr = checkSandbox(&e.cfg, e.log)
	// Runners are the envoy's user too: without this they could read its
	// memory and environment through /proc where no sandbox stops them.
	if err := sandbox.ProtectSelf(); err != nil {
		e.log.Warn("cannot make the envoy's process non-dumpable", "error", err)
	}
	if e.runCollab == nil {
		e.runCollab = DefaultCollaborator
	}
	return e, nil
}

// dialOptions are the options of every connection the envoy and its
// collaborators open: mutual TLS as the envoy, and reconnection on the
// site's retry schedule (see RetryConfig).
func dialOptions(creds Credentials, retry RetryConfig, serverName string) []grpc.DialOption {
	return append(pki.ClientDialOptions(creds.ClientTLS, serverName), retry.schedule().DialOption())
}

// Name is the envoy's name, its certificate's CN.
func (e *Envoy) Name() string { return e.name }

// Shard is the description of the data the envoy registers.
func (e *Envoy) Shard() *fxv1.DatasetShard { return e.shard }

// describeShard says what the site holds without revealing it. The
// description names the data's path, which may be longer than the protocol
// lets a description be: it is clipped rather than refused.
func describeShard(d *dataset.Dataset, tags []string) *fxv1.DatasetShard {
	return &fxv1.DatasetShard{
		Description:  fxv1.Clip(d.Description, fxv1.MaxDescriptionBytes()),
		Tags:         tags,
		SampleShape:  d.SampleShape,
		TargetShape:  []int64{},
		TrainSamples: int64(d.Train.N),
		ValidSamples: int64(d.Valid.N),
		Classes:      int32(d.Classes),
		Devices:      []*fxv1.Device{{Kind: "cpu", Name: fmt.Sprintf("%s/%s, %d cores", runtime.GOOS, runtime.GOARCH, runtime.NumCPU())}},
	}
}

// Run serves the admin socket, restores what the work directory holds, and
// keeps a session with the director until ctx ends. Transient errors never
// end it; it returns an error only when it cannot start (the admin socket
// cannot be created, the work directory cannot be read).
func (e *Envoy) Run(ctx context.Context) error {
	defer e.conn.Close()
	defer e.ledger.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	e.runCtx = ctx

	admin, err := e.listenAdmin()
	if err != nil {
		return err
	}
	metricsLis := e.cfg.Metrics.Listener
	if metricsLis == nil && e.cfg.Metrics.Listen != "" {
		if metricsLis, err = net.Listen("tcp", e.cfg.Metrics.Listen); err != nil {
			admin.Close()
			return fmt.Errorf("metrics.listen: %w", err)
		}
	}
	if err := e.restore(); err != nil {
		admin.Close()
		if metricsLis != nil {
			metricsLis.Close()
		}
		return err
	}
	e.log.Info("envoy started", "version", e.cfg.Version, "director", e.cfg.Director.Address, "data", e.data.String(),
		"review", e.cfg.Review.Policy, "admin_socket", e.cfg.AdminSocketPath())

	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		e.serveAdmin(ctx, admin)
	}()
	if metricsLis != nil {
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			srv := telemetry.Server{Metrics: e.metrics, Ready: e.readiness, Logger: e.log}
			if err := srv.Serve(ctx, metricsLis); err != nil {
				e.log.Warn("metrics listener", "error", err)
			}
		}()
	}
	e.sessions(ctx)
	cancel()
	e.wg.Wait()
	e.log.Info("envoy stopped")
	return nil
}

// rpcContext bounds one unary call.
func (e *Envoy) rpcContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, e.cfg.RPCTimeout)
}

// restore reloads the records of the work directory. Decided offers come
// back as they were, so that a replayed Start rejoins an experiment without
// downloading it again; undecided ones wait for the director to replay the
// offer (the download resumes from the partial file); broken ones, and
// undecided or rejected ones whose answer time has passed, are removed.
func (e *Envoy) restore() error {
	records, broken, err := e.loadRecords()
	if err != nil {
		return fmt.Errorf("work_dir: %w", err)
	}
	for _, id := range broken {
		e.log.Warn("removing an experiment directory without a readable record", "dir", e.expDir(id))
		e.removeDir(id)
	}
	now := time.Now()
	for _, r := range records {
		switch r.Decision {
		case decisionAccept:
			plan, err := e.unpackedPlan(r.ID)
			if err != nil {
				e.log.Warn("an accepted experiment's files are unusable; removing them", "experiment", r.ID, "error", err)
				e.removeDir(r.ID)
				continue
			}
			e.exps[r.ID] = &exp{rec: r, phase: phaseAccepted, plan: plan}
			e.log.Info("restored an accepted experiment", "experiment", r.ID, "name", r.Name)
		case decisionReject:
			if !r.AnswerBy.IsZero() && r.AnswerBy.Before(now) {
				// The offer has closed: no replay will ask again.
				e.removeDir(r.ID)
				continue
			}
			e.exps[r.ID] = &exp{rec: r, phase: phaseRejected}
		default:
			if !r.AnswerBy.IsZero() && r.AnswerBy.Before(now) {
				e.removeDir(r.ID)
			}
		}
	}
	return nil
}

// removeDir deletes an experiment's directory, logging a failure: a file
// left behind costs disk space, not correctness.
func (e *Envoy) removeDir(id string) {
	if err := os.RemoveAll(e.expDir(id)); err != nil {
		e.log.Warn("cannot remove an experiment directory", "dir", e.expDir(id), "error", err)
	}
}

// errStreamClosed ends a session whose assignment stream the director
// closed; the envoy reconnects.
var errStreamClosed = errors.New("the director closed the assignment stream")
