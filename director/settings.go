package director

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

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
	// the director, LauncherProcess, a child process each (Process), or
	// LauncherKubernetes, a Job each (Kubernetes).
	Launcher string `mapstructure:"launcher"`
	// Kubernetes configures launcher kubernetes.
	Kubernetes  KubernetesSettings `mapstructure:"kubernetes"`
	StopTimeout time.Duration      `mapstructure:"stop_timeout"`
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
	switch s.Launcher {
	case LauncherInProcess, LauncherProcess:
	case LauncherKubernetes:
		s.Kubernetes.check(bad)
	default:
		bad("launcher", "%q: use %s (aggregators run inside the director), %s (each experiment's aggregator runs as a child process of the director, restarted from its checkpoint if it dies) or %s (each runs as a Job in a Kubernetes cluster: the kubernetes block)", s.Launcher, LauncherInProcess, LauncherProcess, LauncherKubernetes)
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
	if s.Launcher == LauncherKubernetes {
		kl, err := s.Kubernetes.launcher(s.DataDir)
		if err != nil {
			return Config{}, err
		}
		kl.TLS = pki.Files{Cert: s.TLS.Cert, Key: s.TLS.Key, CA: s.TLS.CA, CRL: s.TLS.CRL}
		kl.Identity = k.Identity().Name
		cfg.Launcher = kl
	}
	return cfg, nil
}

// KubernetesSettings are the kubernetes block: where and how the
// Kubernetes launcher runs aggregators (see Kubernetes).
type KubernetesSettings struct {
	// Kubeconfig is a kubeconfig file; empty: the director runs in the
	// cluster and uses its pod's service account.
	Kubeconfig string `mapstructure:"kubeconfig"`
	// Namespace holds the aggregators' objects; empty: the director's own
	// (in the cluster) or the kubeconfig context's.
	Namespace       string `mapstructure:"namespace"`
	Image           string `mapstructure:"image"`
	ImagePullPolicy string `mapstructure:"image_pull_policy"`
	// PVC is the PersistentVolumeClaim the director's data_dir is on.
	PVC string `mapstructure:"pvc"`
	// ServiceType is ClusterIP, NodePort or LoadBalancer; AdvertiseHost
	// the host envoys dial for a NodePort (and, if set, a LoadBalancer).
	ServiceType   string `mapstructure:"service_type"`
	AdvertiseHost string `mapstructure:"advertise_host"`
	Port          int    `mapstructure:"port"`
	// DirectorAddress is where the aggregator pods reach the director.
	DirectorAddress string `mapstructure:"director_address"`
	// ReadyTimeout is how long a pod may take to be Ready before it
	// counts as a death (restarted, bounded); 0: 10m.
	ReadyTimeout time.Duration `mapstructure:"ready_timeout"`
	// TLSSecret names an existing Secret with the director's tls.crt,
	// tls.key, ca.crt (and crl.pem); empty: the launcher copies tls.*.
	TLSSecret string `mapstructure:"tls_secret"`
	Resources struct {
		Requests KubernetesResources `mapstructure:"requests"`
		Limits   KubernetesResources `mapstructure:"limits"`
	} `mapstructure:"resources"`
}

// KubernetesResources are CPU and memory quantities ("500m", "4Gi").
type KubernetesResources struct {
	CPU    string `mapstructure:"cpu"`
	Memory string `mapstructure:"memory"`
}

func (r KubernetesResources) list() corev1.ResourceList {
	l := corev1.ResourceList{}
	if r.CPU != "" {
		l[corev1.ResourceCPU] = resource.MustParse(r.CPU)
	}
	if r.Memory != "" {
		l[corev1.ResourceMemory] = resource.MustParse(r.Memory)
	}
	if len(l) == 0 {
		return nil
	}
	return l
}

// check reports what the kubernetes block lacks or gets wrong.
func (ks KubernetesSettings) check(bad func(key, format string, args ...any)) {
	if ks.Image == "" {
		bad("kubernetes.image", "is required with launcher %s: the fx container image the aggregator pods run (packaging/container/build.sh makes it), for example registry.example.org/fx:1.0", LauncherKubernetes)
	}
	if ks.PVC == "" {
		bad("kubernetes.pvc", "is required with launcher %s: the PersistentVolumeClaim that data_dir is on (the director mounts it at data_dir; the aggregator pods mount their experiment's directory from it)", LauncherKubernetes)
	}
	if ks.DirectorAddress == "" {
		bad("kubernetes.director_address", "is required with launcher %s: host:port where the aggregator pods reach this director, for example fx-director.fx.svc:50051 (the pods check the director's certificate against advertise.server_name, not this host)", LauncherKubernetes)
	} else if _, _, err := net.SplitHostPort(ks.DirectorAddress); err != nil {
		bad("kubernetes.director_address", "%q: write host:port (%v)", ks.DirectorAddress, err)
	}
	switch corev1.ServiceType(ks.ServiceType) {
	case "", corev1.ServiceTypeClusterIP, corev1.ServiceTypeLoadBalancer:
	case corev1.ServiceTypeNodePort:
		if ks.AdvertiseHost == "" {
			bad("kubernetes.advertise_host", "is required with kubernetes.service_type NodePort: the host (a node's name or address) envoys dial with each aggregator's node port")
		}
	default:
		bad("kubernetes.service_type", "%q: use ClusterIP (envoys in the cluster), NodePort or LoadBalancer", ks.ServiceType)
	}
	switch corev1.PullPolicy(ks.ImagePullPolicy) {
	case "", corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		bad("kubernetes.image_pull_policy", "%q: use Always, IfNotPresent or Never (or leave it out)", ks.ImagePullPolicy)
	}
	if ks.ReadyTimeout < 0 {
		bad("kubernetes.ready_timeout", "%s is negative: a duration such as 10m, or 0 for %s", ks.ReadyTimeout, DefaultKubernetesReadyTimeout)
	}
	if ks.Port < 0 || ks.Port > 65535 {
		bad("kubernetes.port", "%d: a TCP port, or 0 for %d", ks.Port, DefaultKubernetesPort)
	}
	for key, q := range map[string]string{
		"kubernetes.resources.requests.cpu": ks.Resources.Requests.CPU, "kubernetes.resources.requests.memory": ks.Resources.Requests.Memory,
		"kubernetes.resources.limits.cpu": ks.Resources.Limits.CPU, "kubernetes.resources.limits.memory": ks.Resources.Limits.Memory,
	} {
		if q == "" {
			continue
		}
		if _, err := resource.ParseQuantity(q); err != nil {
			bad(key, "%q: write a Kubernetes quantity such as 500m or 2 (CPU), 4Gi (memory)", q)
		}
	}
}

// launcher makes the Kubernetes launcher of checked settings: the client
// from the kubeconfig or, without one, the pod's service account.
func (ks KubernetesSettings) launcher(dataDir string) (*Kubernetes, error) {
	var rc *rest.Config
	ns := ks.Namespace
	if ks.Kubeconfig != "" {
		cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(&clientcmd.ClientConfigLoadingRules{ExplicitPath: ks.Kubeconfig}, &clientcmd.ConfigOverrides{})
		var err error
		if rc, err = cc.ClientConfig(); err != nil {
			return nil, fmt.Errorf("kubernetes.kubeconfig: %s: %w", ks.Kubeconfig, err)
		}
		if ns == "" {
			if ns, _, err = cc.Namespace(); err != nil {
				return nil, fmt.Errorf("kubernetes.kubeconfig: %s: its namespace: %w", ks.Kubeconfig, err)
			}
		}
	} else {
		var err error
		if rc, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("kubernetes.kubeconfig: not set, and the director does not run in a Kubernetes pod (%v): set it to a kubeconfig file", err)
		}
		if ns == "" {
			b, err := os.ReadFile(inClusterNamespaceFile)
			if err != nil {
				return nil, fmt.Errorf("kubernetes.namespace: not set, and the pod's own cannot be read (%v): set it", err)
			}
			ns = strings.TrimSpace(string(b))
		}
	}
	client, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	return &Kubernetes{
		Client:          client,
		Namespace:       ns,
		Image:           ks.Image,
		ImagePullPolicy: corev1.PullPolicy(ks.ImagePullPolicy),
		PVC:             ks.PVC,
		DataDir:         dataDir,
		ServiceType:     corev1.ServiceType(ks.ServiceType),
		AdvertiseHost:   ks.AdvertiseHost,
		Port:            int32(ks.Port),
		Resources:       corev1.ResourceRequirements{Requests: ks.Resources.Requests.list(), Limits: ks.Resources.Limits.list()},
		TLSSecret:       ks.TLSSecret,
		DirectorAddress: ks.DirectorAddress,
		ReadyTimeout:    ks.ReadyTimeout,
	}, nil
}

// inClusterNamespaceFile holds the namespace of a pod's service account.
const inClusterNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

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
