package director

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/fx-fl/fx/internal/telemetry"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/experiment"
)

// Review policies.
const (
	// ReviewAuto queues every experiment as soon as it is submitted.
	ReviewAuto = "auto"
	// ReviewManual holds every experiment PENDING until an admin approves
	// or rejects it.
	ReviewManual = "manual"
)

// Defaults.
const (
	DefaultHeartbeatPeriod = 10 * time.Second
	DefaultOfflineAfter    = 30 * time.Second
	DefaultMaxConcurrent   = 4
	DefaultMaxArchiveBytes = 2 << 30
	DefaultStopTimeout     = 10 * time.Second
	// DefaultSweepPeriod is how often offer deadlines and envoy liveness
	// are checked.
	DefaultSweepPeriod = time.Second
	// DefaultUploadIdleTimeout abandons a stalled upload.
	DefaultUploadIdleTimeout = 2 * time.Minute
	// DefaultMaxUploadsPerResearcher is how many archives one researcher
	// may be uploading at once.
	DefaultMaxUploadsPerResearcher = 2
	// DefaultAggregatorHost is loopback: aggregators serve other machines
	// only when told to.
	DefaultAggregatorHost = "127.0.0.1"
	// MaxChunk is the largest chunk the director sends or accepts.
	MaxChunk = 1 << 20
	// DefaultSnapshotInterval and DefaultSnapshotsKept: a copy of the store
	// every 10 minutes in which something changed, the newest 24 kept.
	DefaultSnapshotInterval = 10 * time.Minute
	DefaultSnapshotsKept    = 24
	// DefaultDiskReserve is what data_dir's file system keeps free: no
	// experiment is accepted, and no round started, that would eat into it.
	DefaultDiskReserve = 256 << 20
)

// Config is what a Director needs. Only DataDir is required when the
// director is driven without a network server (tests); Run also needs
// Listener or ListenAddress, and ServerOptions carrying the TLS credentials
// and the pki interceptors.
type Config struct {
	// DataDir holds the store (director.db), archives, aggregator
	// checkpoints and models.
	DataDir string
	// PostgresDSN, if set, keeps the director's state in that PostgreSQL
	// database (store.Postgres) instead of DataDir/director.db; the files
	// stay in DataDir. The store is then not snapshotted: backing the
	// database up is PostgreSQL's business (pg_dump, point-in-time
	// recovery). It may carry a password and is never logged.
	PostgresDSN string
	// ListenAddress is where the Director service listens (host:port);
	// ignored when Listener is set.
	ListenAddress string
	Listener      net.Listener
	// MetricsListen, if set, is host:port of the plain-HTTP listener for
	// /metrics, /healthz and /readyz (telemetry.Server); MetricsListener
	// is one of the caller's instead. Off when both are unset.
	MetricsListen   string
	MetricsListener net.Listener
	// Metrics, if set, are the series the director records into; it makes
	// its own when it has a metrics listener and none is given.
	Metrics *telemetry.Metrics
	// Version is this build's, for fx_build_info.
	Version string
	// ServerOptions configure the director's gRPC server: TLS credentials
	// and the interceptors that authenticate callers and enforce the roles
	// table. Without an interceptor that puts a pki.Identity in the
	// context, every call fails UNAUTHENTICATED.
	ServerOptions []grpc.ServerOption
	// AggregatorServerOptions do the same for each aggregator's server,
	// which presents the director's certificate.
	AggregatorServerOptions []grpc.ServerOption

	// AdvertiseHost is the host envoys dial to reach this director's
	// aggregators (it must be in the director certificate's SANs).
	AdvertiseHost string
	// ServerName is the name aggregators' certificates carry (the
	// director's CN), sent to envoys in Start assignments.
	ServerName string
	// AggregatorHost is the interface aggregators listen on.
	AggregatorHost string
	// AggregatorPortMin and AggregatorPortMax bound the aggregators' ports;
	// both zero means an ephemeral port each.
	AggregatorPortMin, AggregatorPortMax int

	HeartbeatPeriod time.Duration
	// OfflineAfter is the grace period after which an envoy that has not
	// heartbeated is offline.
	OfflineAfter time.Duration
	// ReviewPolicy is ReviewAuto or ReviewManual.
	ReviewPolicy string
	// MaxConcurrent caps the experiments offered or running at once; more
	// wait QUEUED.
	MaxConcurrent int
	// MaxArchiveBytes caps an archive's size as uploaded.
	MaxArchiveBytes int64
	// MaxUploadsPerResearcher caps the uploads (SubmitExperiment) one
	// researcher has in progress at once: each holds a handler, a
	// temporary file and disk space up to MaxArchiveBytes until it ends.
	MaxUploadsPerResearcher int
	// ArchiveLimits cap what an archive unpacks to.
	ArchiveLimits experiment.Limits
	// StopTimeout bounds the graceful stop of the gRPC server before it is
	// stopped hard.
	StopTimeout time.Duration
	// SweepPeriod is how often deadlines and liveness are checked.
	SweepPeriod time.Duration
	// UploadIdleTimeout abandons an upload that sends nothing for this
	// long.
	UploadIdleTimeout time.Duration
	// SnapshotInterval is how often the store is copied to
	// DataDir/snapshots (when it changed); it is also copied at every
	// start and clean stop. Negative: only then.
	SnapshotInterval time.Duration
	// SnapshotsKept is how many snapshots are kept; negative: none are
	// taken.
	SnapshotsKept int
	// DiskReserve is what the file system under DataDir must keep free:
	// a submission whose experiment would not leave it is refused, and a
	// round that would not leave it waits, PAUSED. Negative: none.
	DiskReserve int64
	// PauseRetry is how often a PAUSED experiment's aggregator checks
	// whether its cause is gone; aggregator.DefaultPauseRetry when zero.
	PauseRetry time.Duration

	// Store replaces the store of DataDir or PostgresDSN (tests: see
	// mock_store_test.go, generated by the line below Config).
	Store store.Store
	// Launcher starts aggregators; InProcess when nil.
	Launcher Launcher
	// Clock is the time source; the system clock when nil.
	Clock  Clock
	Logger hclog.Logger
}

//go:generate go tool mockgen -destination=mock_store_test.go -package=director github.com/fx-fl/fx/director/store Store

func (c *Config) setDefaults() {
	if c.HeartbeatPeriod == 0 {
		c.HeartbeatPeriod = DefaultHeartbeatPeriod
	}
	if c.OfflineAfter == 0 {
		c.OfflineAfter = DefaultOfflineAfter
	}
	if c.ReviewPolicy == "" {
		c.ReviewPolicy = ReviewManual
	}
	if c.MaxConcurrent == 0 {
		c.MaxConcurrent = DefaultMaxConcurrent
	}
	if c.MaxArchiveBytes == 0 {
		c.MaxArchiveBytes = DefaultMaxArchiveBytes
	}
	if c.MaxUploadsPerResearcher == 0 {
		c.MaxUploadsPerResearcher = DefaultMaxUploadsPerResearcher
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = DefaultStopTimeout
	}
	if c.SweepPeriod == 0 {
		c.SweepPeriod = DefaultSweepPeriod
	}
	if c.UploadIdleTimeout == 0 {
		c.UploadIdleTimeout = DefaultUploadIdleTimeout
	}
	if c.SnapshotInterval == 0 {
		c.SnapshotInterval = DefaultSnapshotInterval
	}
	if c.SnapshotsKept == 0 {
		c.SnapshotsKept = DefaultSnapshotsKept
	}
	if c.DiskReserve == 0 {
		c.DiskReserve = DefaultDiskReserve
	}
	c.DiskReserve = max(c.DiskReserve, 0)
	if c.AggregatorHost == "" {
		c.AggregatorHost = DefaultAggregatorHost
	}
	if c.Launcher == nil {
		c.Launcher = InProcess{}
	}
	if c.Clock == nil {
		c.Clock = SystemClock{}
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
}

// validate names the setting at fault, as the configuration file spells it.
func (c *Config) validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if c.DataDir == "" {
		bad("data_dir", "is required: the directory for the store, archives and models")
	}
	if c.PostgresDSN != "" {
		if _, err := store.PostgresTarget(c.PostgresDSN); err != nil {
			bad("store.postgres.dsn", "%v", err)
		}
	}
	if c.HeartbeatPeriod < 0 {
		bad("heartbeat_period", "%s is negative", c.HeartbeatPeriod)
	}
	if c.OfflineAfter <= c.HeartbeatPeriod {
		bad("offline_after", "%s must be longer than heartbeat_period (%s), or every envoy flaps offline between heartbeats", c.OfflineAfter, c.HeartbeatPeriod)
	}
	if c.ReviewPolicy != ReviewAuto && c.ReviewPolicy != ReviewManual {
		bad("review_policy", "%q: use %s or %s", c.ReviewPolicy, ReviewAuto, ReviewManual)
	}
	if c.MaxConcurrent < 1 {
		bad("max_concurrent_experiments", "%d: at least 1", c.MaxConcurrent)
	}
	if c.MaxArchiveBytes < 1 {
		bad("max_archive_bytes", "%d: at least 1", c.MaxArchiveBytes)
	}
	if c.MaxUploadsPerResearcher < 1 {
		bad("max_uploads_per_researcher", "%d: at least 1", c.MaxUploadsPerResearcher)
	}
	if c.StopTimeout < 0 {
		bad("stop_timeout", "%s is negative", c.StopTimeout)
	}
	if c.SweepPeriod < 0 {
		bad("sweep_period", "%s is negative", c.SweepPeriod)
	}
	if c.UploadIdleTimeout < 0 {
		bad("upload_idle_timeout", "%s is negative", c.UploadIdleTimeout)
	}
	lo, hi := c.AggregatorPortMin, c.AggregatorPortMax
	switch {
	case lo == 0 && hi == 0:
	case lo < 1 || hi > 65535 || lo > hi:
		bad("aggregator.port_min/port_max", "%d-%d: give 1 ≤ port_min ≤ port_max ≤ 65535, or both 0 for ephemeral ports", lo, hi)
	}
	return errors.Join(errs...)
}
