package director

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/fx-fl/fx/internal/tracing"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/pki"
)

// Settings are the director's configuration file (configs/director.yaml),
// loaded by `fx director start` through internal/config: every field's
// mapstructure key is a key of the file and, as FX_<KEY>, of the
// environment.
type Settings struct {
	// ListenAddress is where the Director service listens.
	ListenAddress string `mapstructure:"listen_address"`
	Advertise     struct {
		// Host is the host envoys dial to reach this director's
		// aggregators; it must be among the certificate's SANs.
		Host string `mapstructure:"host"`
		// ServerName is the name envoys check on the aggregators'
		// certificate; default the director certificate's CN.
		ServerName string `mapstructure:"server_name"`
	} `mapstructure:"advertise"`
	TLS struct {
		Cert string `mapstructure:"cert"`
		Key  string `mapstructure:"key"`
		CA   string `mapstructure:"ca"`
		// CRL is optional; with it revoked parties are refused.
		CRL string `mapstructure:"crl"`
	} `mapstructure:"tls"`
	DataDir string `mapstructure:"data_dir"`
	// Store is where the director keeps its state: bbolt, a file in
	// data_dir (the default), or postgres, a PostgreSQL database.
	Store struct {
		Kind     string `mapstructure:"kind"`
		Postgres struct {
			// DSN is a postgres:// URL or keyword=value pairs. It may
			// carry a password: FX_STORE_POSTGRES_DSN keeps it out of
			// the file, and nothing logs it.
			DSN string `mapstructure:"dsn"`
		} `mapstructure:"postgres"`
	} `mapstructure:"store"`
	HeartbeatPeriod time.Duration `mapstructure:"heartbeat_period"`
	OfflineAfter    time.Duration `mapstructure:"offline_after"`
	ReviewPolicy    string        `mapstructure:"review_policy"`
	MaxConcurrent   int           `mapstructure:"max_concurrent_experiments"`
	MaxArchiveBytes int64         `mapstructure:"max_archive_bytes"`
	// MaxUploadsPerResearcher caps one researcher's uploads in progress.
	MaxUploadsPerResearcher int `mapstructure:"max_uploads_per_researcher"`
	Aggregator              struct {
		// Host is the interface aggregators listen on.
		Host string `mapstructure:"host"`
		// PortMin and PortMax bound their ports; both 0 for ephemeral.
		PortMin int `mapstructure:"port_min"`
		PortMax int `mapstructure:"port_max"`
	} `mapstructure:"aggregator"`
	// Launcher is how aggregators run: LauncherInProcess, goroutines of
	// the director, or LauncherProcess, a child process each (Process).
	Launcher    string        `mapstructure:"launcher"`
	StopTimeout time.Duration `mapstructure:"stop_timeout"`
	// UploadIdleTimeout abandons an upload that sends nothing for this long.
	UploadIdleTimeout time.Duration `mapstructure:"upload_idle_timeout"`
	// Snapshots are the copies of the store that `fx director recover`
	// restores.
	Snapshots struct {
		Interval time.Duration `mapstructure:"interval"`
		Keep     int           `mapstructure:"keep"`
	} `mapstructure:"snapshots"`
	// DiskReserveBytes is what data_dir's file system keeps free.
	DiskReserveBytes int64 `mapstructure:"disk_reserve_bytes"`
	// PauseRetry is how often a PAUSED experiment checks its cause.
	PauseRetry time.Duration `mapstructure:"pause_retry"`
	// Metrics is the plain-HTTP listener for /metrics, /healthz and
	// /readyz; off when Listen is empty.
	Metrics struct {
		Listen string `mapstructure:"listen"`
	} `mapstructure:"metrics"`
	// Tracing sends spans to an OTLP collector; off when its endpoint is
	// empty. The process sets it up (tracing.Setup) before New.
	Tracing tracing.Config `mapstructure:"tracing"`
}

// DefaultSettings are what a configuration file overrides.
func DefaultSettings() Settings {
	var s Settings
	// Loopback: a director serves other machines only when told to.
	s.ListenAddress = "127.0.0.1:50051"
	s.Advertise.Host = "localhost"
	s.DataDir = "./director-data"
	s.Store.Kind = StoreBolt
	s.HeartbeatPeriod = DefaultHeartbeatPeriod
	s.OfflineAfter = DefaultOfflineAfter
	s.ReviewPolicy = ReviewManual
	s.MaxConcurrent = DefaultMaxConcurrent
	s.MaxArchiveBytes = DefaultMaxArchiveBytes
	s.MaxUploadsPerResearcher = DefaultMaxUploadsPerResearcher
	s.Aggregator.Host = DefaultAggregatorHost
	s.Launcher = LauncherInProcess
	s.StopTimeout = DefaultStopTimeout
	s.UploadIdleTimeout = DefaultUploadIdleTimeout
	s.Snapshots.Interval = DefaultSnapshotInterval
	s.Snapshots.Keep = DefaultSnapshotsKept
	s.DiskReserveBytes = DefaultDiskReserve
	s.PauseRetry = aggregator.DefaultPauseRetry
	return s
}

// Config checks the settings and turns them into a Config: it loads the
// director's certificate (which must carry role director) into a keyring
// that reloads on change, and builds the servers' TLS and authorisation
// options from it. Every error names the setting at fault.
func (s Settings) Config(logger hclog.Logger) (Config, error) {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if s.ListenAddress == "" {
		bad("listen_address", "is required (host:port)")
	}
	if s.Advertise.Host == "" {
		bad("advertise.host", "is required: the host envoys dial to reach aggregators")
	}
	for key, path := range map[string]string{"tls.cert": s.TLS.Cert, "tls.key": s.TLS.Key, "tls.ca": s.TLS.CA} {
		if path == "" {
			bad(key, "is required")
		} else if _, err := os.Stat(path); err != nil {
			bad(key, "%v", err)
		}
	}
	if s.Snapshots.Keep < 1 {
		bad("snapshots.keep", "%d: at least 1; without snapshots `fx director recover` has nothing to restore", s.Snapshots.Keep)
	}
	if s.DiskReserveBytes < 0 {
		bad("disk_reserve_bytes", "%d is negative: use 0 for no reserve", s.DiskReserveBytes)
	}
	if s.PauseRetry <= 0 {
		bad("pause_retry", "%s: must be positive", s.PauseRetry)
	}
	if s.Snapshots.Interval <= 0 {
		bad("snapshots.interval", "%s: must be positive", s.Snapshots.Interval)
	}
	if s.TLS.CRL != "" {
		if _, err := os.Stat(s.TLS.CRL); err != nil {
			bad("tls.crl", "%v", err)
		}
	}
	switch {
	case s.Store.Kind != StoreBolt && s.Store.Kind != StorePostgres:
		bad("store.kind", "%q: use %s (a file in data_dir) or %s (a PostgreSQL database, store.postgres.dsn)", s.Store.Kind, StoreBolt, StorePostgres)
	case s.Store.Kind == StorePostgres && s.Store.Postgres.DSN == "":
		bad("store.postgres.dsn", "is required with store.kind %s: the database's postgres:// URL or keyword=value pairs", StorePostgres)
	case s.Store.Kind == StoreBolt && s.Store.Postgres.DSN != "":
		bad("store.postgres.dsn", "is set, but store.kind is %s: set store.kind to %s to keep the state in that database, or remove the DSN", StoreBolt, StorePostgres)
	}
	if s.Launcher != LauncherInProcess && s.Launcher != LauncherProcess {
		bad("launcher", "%q: use %s (aggregators run inside the director) or %s (each experiment's aggregator runs as a child process of the director, restarted from its checkpoint if it dies)", s.Launcher, LauncherInProcess, LauncherProcess)
	}
	cfg := Config{
		DataDir:                 s.DataDir,
		PostgresDSN:             s.PostgresDSN(),
		ListenAddress:           s.ListenAddress,
		AdvertiseHost:           s.Advertise.Host,
		ServerName:              s.Advertise.ServerName,
		AggregatorHost:          s.Aggregator.Host,
		AggregatorPortMin:       s.Aggregator.PortMin,
		AggregatorPortMax:       s.Aggregator.PortMax,
		HeartbeatPeriod:         s.HeartbeatPeriod,
		OfflineAfter:            s.OfflineAfter,
		ReviewPolicy:            s.ReviewPolicy,
		MaxConcurrent:           s.MaxConcurrent,
		MaxArchiveBytes:         s.MaxArchiveBytes,
		MaxUploadsPerResearcher: s.MaxUploadsPerResearcher,
		StopTimeout:             s.StopTimeout,
		UploadIdleTimeout:       s.UploadIdleTimeout,
		SnapshotInterval:        s.Snapshots.Interval,
		SnapshotsKept:           s.Snapshots.Keep,
		DiskReserve:             reserve(s.DiskReserveBytes),
		PauseRetry:              s.PauseRetry,
		MetricsListen:           s.Metrics.Listen,
		Logger:                  logger,
	}
	if err := cfg.validate(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return Config{}, errors.Join(errs...)
	}
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	k, err := pki.NewKeyring(pki.KeyringConfig{
		Files:  pki.Files{Cert: s.TLS.Cert, Key: s.TLS.Key, CA: s.TLS.CA, CRL: s.TLS.CRL},
		Logger: logger.Named("tls"),
	})
	if err != nil {
		return Config{}, fmt.Errorf("tls: %w", err)
	}
	if id := k.Identity(); id.Role != pki.RoleDirector {
		return Config{}, fmt.Errorf("tls.cert: %s is the certificate of %s; the director needs one with role director (fx pki certify --role director)", s.TLS.Cert, id)
	}
	if cfg.ServerName == "" {
		cfg.ServerName = k.Identity().Name
	}
	// Envoys check the aggregators' certificate (the director's) against
	// this name; one the certificate does not carry fails every handshake.
	if err := k.Certificate().VerifyHostname(cfg.ServerName); err != nil {
		key := "advertise.server_name"
		if s.Advertise.ServerName == "" {
			key += " (default: the certificate's CN)"
		}
		return Config{}, fmt.Errorf("%s: %q is not among the names of %s (%v): envoys could not verify the aggregators", key, cfg.ServerName, s.TLS.Cert, err)
	}
	cfg.ServerOptions, cfg.AggregatorServerOptions = ServerOptions(k)
	if s.Launcher == LauncherProcess {
		// The children present the director's certificate and report to
		// it with it: only this certificate's CN may open their channel.
		cfg.Launcher = &Process{
			TLS:      pki.Files{Cert: s.TLS.Cert, Key: s.TLS.Key, CA: s.TLS.CA, CRL: s.TLS.CRL},
			Identity: k.Identity().Name,
		}
	}
	return cfg, nil
}

// Store kinds (store.kind).
const (
	StoreBolt     = "bbolt"
	StorePostgres = "postgres"
)

// PostgresDSN is the PostgreSQL store's connection string, or "" when the
// store is bbolt.
func (s Settings) PostgresDSN() string {
	if s.Store.Kind != StorePostgres {
		return ""
	}
	return s.Store.Postgres.DSN
}

// reserve turns disk_reserve_bytes into Config.DiskReserve, whose zero
// means the default: 0 in the file means no reserve.
func reserve(n int64) int64 {
	if n == 0 {
		return -1
	}
	return n
}
