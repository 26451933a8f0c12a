package envoy

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fx-fl/fx/internal/directors"
	"github.com/fx-fl/fx/internal/tracing"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/backoff"
	"github.com/fx-fl/fx/privacy"
)

// Review policies: how the data owner decides on an offered experiment.
const (
	// PolicyAuto accepts every offer whose archive downloads, verifies and
	// unpacks, and whose plan this envoy can run.
	PolicyAuto = "auto"
	// PolicyManual holds every offer until a person at the site runs
	// `fx envoy approve` or `fx envoy reject`.
	PolicyManual = "manual"
	// PolicyAllowlist accepts an archive only when its sha256 is listed in
	// the allow-list file, and rejects the rest.
	PolicyAllowlist = "allowlist"
)

// Defaults of the settings a configuration may leave out.
const (
	DefaultWorkDir        = "./envoy-work"
	DefaultMaxExperiments = 1
	// DefaultMaxArchiveBytes matches the director's default limit.
	DefaultMaxArchiveBytes = 2 << 30
	DefaultRPCTimeout      = 15 * time.Second
	DefaultRetryInitial    = 500 * time.Millisecond
	DefaultRetryMax        = 30 * time.Second
)

// Bounds on the tags an envoy registers: the protocol's (proto/fx/v1,
// DatasetShard.tags), checked at start-up so a site learns of a bad tag
// before the director refuses every registration.
const (
	maxTags     = 32
	maxTagBytes = 64
)

// DirectorConfig says where the director listens.
type DirectorConfig struct {
	// Address is host:port of the director; with active and standby
	// directors, every director's host:port separated by commas (or one
	// dns:///name:port with a record per director): the envoy follows
	// whichever leads (internal/directors).
	Address string `mapstructure:"address"`
	// ServerName is the name the director's certificate must carry; empty
	// means the host part of Address (of each address, with several).
	ServerName string `mapstructure:"server_name"`
}

// TLSConfig names the envoy's certificate, its key and the federation's
// root certificate, as written by `fx pki` or scripts/pki-bootstrap.sh.
type TLSConfig struct {
	// Cert is the envoy's certificate followed by the signing CA's.
	Cert string `mapstructure:"cert"`
	// Key is the envoy's private key.
	Key string `mapstructure:"key"`
	// CA holds the federation root certificate(s).
	CA string `mapstructure:"ca"`
	// CRL is the federation's revocation list, optional: with it the envoy
	// refuses a director or aggregator whose certificate was revoked.
	CRL string `mapstructure:"crl"`
}

// ReviewConfig is the data owner's policy for offered experiments.
type ReviewConfig struct {
	// Policy is auto, manual or allowlist.
	Policy string `mapstructure:"policy"`
	// Allowlist is a file of accepted archive digests, one lower-case hex
	// sha256 a line ('#' starts a comment); policy allowlist only. It is
	// read at every decision, so the owner edits it without a restart.
	Allowlist string `mapstructure:"allowlist"`
}

// ExecConfig is the site's policy for exec runners, which run the
// experiment's own command at the site.
type ExecConfig struct {
	// Allow lets plans with runner kind exec be accepted. Such a command
	// runs as the envoy's user and can read what it can: a site that does
	// not want researchers' code set it to false and runs built-in models
	// only (or reviews each archive under the manual or allowlist policy).
	Allow bool `mapstructure:"allow"`
	// Env holds KEY=VALUE variables the command may see (PATH, PYTHONPATH,
	// CUDA_VISIBLE_DEVICES); it never sees the envoy's own environment.
	Env []string `mapstructure:"env"`
	// Python is the interpreter that runs plans whose command is python or
	// python3 (an absolute path, such as /opt/venv/bin/python3): the site
	// decides which installation and packages its runners get. Empty: the
	// python3 found in the runners' PATH (exec.env's PATH, else
	// /usr/local/bin:/usr/bin:/bin), never the envoy's own PATH.
	Python string `mapstructure:"python"`
	// Sandbox confines runners (Landlock and a seccomp filter, see
	// docs/security.md): they read the experiment, the site's data and
	// the system's programs, write only their own scratch directory, and
	// cannot read the envoy's key, configuration or other experiments.
	// On by default; where the system cannot sandbox, exec runners are
	// refused unless the site sets it to false and runs experiments' code
	// unconfined, at its own risk.
	Sandbox bool `mapstructure:"sandbox"`
	// Network lets sandboxed runners use the network (TCP, UDP); off by
	// default, so a runner cannot send the site's data anywhere but in
	// its results.
	Network bool `mapstructure:"network"`
	// ShareLogs sends what runners print to the director, where the
	// experiment's owner reads it (`fx experiment logs`), and lets failure
	// reasons quote the runner's last lines. Off by default: a runner's
	// output can quote the site's data, so a site shares it only when its
	// data protection allows.
	ShareLogs bool `mapstructure:"share_logs"`
}

// PrivacyConfig is the data owner's differential-privacy policy
// (privacy); docs/privacy.md explains it.
type PrivacyConfig struct {
	// RequireDP declines every plan that does not state privacy.dp: no
	// update leaves the site without clipping and noise. It needs Budget.
	RequireDP bool `mapstructure:"require_dp"`
	// Budget is what the site's data may spend over every experiment ever
	// run on it, kept in the ledger <work_dir>/privacy.json. A plan whose
	// rounds do not all fit, or whose σ or C the budget refuses, is
	// declined with the numbers; every round is charged before its update
	// leaves. Unset (no epsilon): plans with DP are clipped and noised as
	// they ask, but not accounted.
	Budget privacy.Budget `mapstructure:"budget"`
	// Dataset names the site's data in the ledger; empty: the envoy's name.
	// Rename it only when the envoy serves other data: a new name starts
	// with an untouched budget.
	Dataset string `mapstructure:"dataset"`
}

// budgeted reports whether the site keeps a privacy budget.
func (p PrivacyConfig) budgeted() bool { return p.Budget != (privacy.Budget{}) }

// RetryConfig is the capped exponential backoff of every retry loop of the
// envoy and its collaborators, and of the gRPC connections under them: Max
// bounds every pause between two attempts to reach the director or an
// aggregator, so a party back from an outage is found within Max.
type RetryConfig struct {
	Initial time.Duration `mapstructure:"initial"`
	Max     time.Duration `mapstructure:"max"`
}

func (r RetryConfig) schedule() backoff.Config { return backoff.Config{Initial: r.Initial, Max: r.Max} }

// Config is everything an envoy needs. The fields with mapstructure keys
// come from configs/envoy.yaml (see internal/config); the others are set by
// the program that embeds the envoy.
type Config struct {
	// Name is the envoy's name. It is its certificate's CN; when set here it
	// must equal the CN, which catches a site started with the wrong
	// certificate. Empty means the CN.
	Name     string         `mapstructure:"name"`
	Director DirectorConfig `mapstructure:"director"`
	TLS      TLSConfig      `mapstructure:"tls"`
	// WorkDir holds downloaded archives, unpacked experiments, their state,
	// and by default the admin socket. It survives restarts: an envoy that
	// comes back finds what it accepted there and does not download again.
	WorkDir string `mapstructure:"work_dir"`
	// MaxExperiments is how many experiments the envoy runs at once.
	MaxExperiments int `mapstructure:"max_experiments"`
	// MaxArchiveBytes bounds the archive of an offer the envoy downloads;
	// a larger one is rejected before a byte is written.
	MaxArchiveBytes int64 `mapstructure:"max_archive_bytes"`
	// Tags label the data so researchers can select it ("fashion-mnist").
	Tags []string `mapstructure:"tags"`
	// Shard is the site's data; it is loaded at start-up, so missing or
	// malformed files stop the envoy before it registers.
	Shard  dataset.Config `mapstructure:"shard"`
	Review ReviewConfig   `mapstructure:"review"`
	Exec   ExecConfig     `mapstructure:"exec"`
	// Privacy is the site's differential-privacy policy and budget.
	Privacy PrivacyConfig `mapstructure:"privacy"`
	// AdminSocket is the unix socket `fx envoy pending|approve|reject` talk
	// to; empty means <work_dir>/admin/envoy.sock.
	AdminSocket string `mapstructure:"admin_socket"`
	// RPCTimeout bounds every unary call to the director, and the silence
	// allowed between two chunks of a download.
	RPCTimeout time.Duration `mapstructure:"rpc_timeout"`
	Retry      RetryConfig   `mapstructure:"retry"`
	// Metrics is the plain-HTTP listener for /metrics, /healthz and
	// /readyz (see internal/telemetry); off when Listen is empty.
	Metrics MetricsConfig `mapstructure:"metrics"`
	// Tracing sends spans to an OTLP collector; off when its endpoint is
	// empty. The process sets it up (tracing.Setup) before New.
	Tracing tracing.Config `mapstructure:"tracing"`

	// ConfigFile is the file the configuration was read from, if any: it
	// is hidden from runners, with the key and the work directory.
	ConfigFile string `mapstructure:"-"`
	// Logger receives the envoy's logs; nil discards them.
	Logger hclog.Logger `mapstructure:"-"`
	// Version is reported to the director at registration.
	Version string `mapstructure:"-"`
	// Credentials builds the TLS identity; nil loads the TLS files through a
	// reloading pki.Keyring. Embedding programs may supply their own.
	Credentials CredentialsSource `mapstructure:"-"`
	// NewRunner builds the task runner of an accepted plan; nil uses the
	// runners this binary has (see DefaultRunner).
	NewRunner RunnerFactory `mapstructure:"-"`
	// RunCollaborator runs one experiment's collaborator until it ends; nil
	// uses the collaborator package (see DefaultCollaborator).
	RunCollaborator CollaboratorFunc `mapstructure:"-"`
}

// MetricsConfig configures the operations listener.
type MetricsConfig struct {
	// Listen is host:port; keep it on loopback unless a remote
	// Prometheus scrapes it.
	Listen string `mapstructure:"listen"`
	// Listener, if set, is one of the caller's instead (tests).
	Listener net.Listener `mapstructure:"-"`
}

// DefaultConfig returns the defaults that a configuration file overrides.
func DefaultConfig() Config {
	return Config{
		WorkDir:         DefaultWorkDir,
		MaxExperiments:  DefaultMaxExperiments,
		MaxArchiveBytes: DefaultMaxArchiveBytes,
		Review:          ReviewConfig{Policy: PolicyAuto},
		Exec:            ExecConfig{Allow: true, Sandbox: true},
		RPCTimeout:      DefaultRPCTimeout,
		Retry:           RetryConfig{Initial: DefaultRetryInitial, Max: DefaultRetryMax},
	}
}

// AdminSocketPath is where the admin socket lives under this configuration.
func (c *Config) AdminSocketPath() string {
	if c.AdminSocket != "" {
		return c.AdminSocket
	}
	return filepath.Join(c.WorkDir, "admin", "envoy.sock")
}

// directorServerName is the name the director's certificate must carry.
func (c *Config) directorServerName() string {
	if c.Director.ServerName != "" || directors.Several(c.Director.Address) {
		return c.Director.ServerName // "": each address's own host
	}
	host, _, err := net.SplitHostPort(c.Director.Address)
	if err != nil {
		return c.Director.Address
	}
	return host
}

// Validate checks the settings without touching the network. It names every
// problem it finds, with the key to fix, so a site fixes them in one go.
func (c *Config) Validate() error {
	var problems []string
	add := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

	if c.Name != "" {
		if err := experiment.ValidateName("envoy", c.Name); err != nil {
			add("name: %v", err)
		}
	}
	if c.Director.Address == "" {
		add("director.address is required (host:port of the director, or of each director separated by commas)")
	} else if _, err := directors.Split(c.Director.Address); err != nil {
		add("%v", err)
	}
	if c.Credentials == nil {
		for _, f := range []struct{ key, path string }{{"tls.cert", c.TLS.Cert}, {"tls.key", c.TLS.Key}, {"tls.ca", c.TLS.CA}} {
			if f.path == "" {
				add("%s is required", f.key)
			}
		}
	}
	if c.WorkDir == "" {
		add("work_dir is required")
	}
	if c.MaxExperiments < 1 {
		add("max_experiments must be at least 1, got %d", c.MaxExperiments)
	}
	if c.MaxArchiveBytes < 1 {
		add("max_archive_bytes must be positive, got %d", c.MaxArchiveBytes)
	}
	if len(c.Tags) > maxTags {
		add("tags: %d tags, at most %d (the director refuses more)", len(c.Tags), maxTags)
	}
	for i, t := range c.Tags {
		switch {
		case strings.TrimSpace(t) == "":
			add("tags[%d] is empty", i)
		case len(t) > maxTagBytes:
			add("tags[%d] is %d bytes, at most %d (the director refuses longer)", i, len(t), maxTagBytes)
		}
	}
	if err := c.Shard.Validate(); err != nil {
		add("shard: %v", err)
	}
	switch c.Review.Policy {
	case PolicyAuto, PolicyManual:
		if c.Review.Allowlist != "" {
			add("review.allowlist is set but review.policy is %q: set policy allowlist or remove the file", c.Review.Policy)
		}
	case PolicyAllowlist:
		if c.Review.Allowlist == "" {
			add("review.policy allowlist needs review.allowlist, a file of sha256 digests")
		} else if _, err := ReadAllowlist(c.Review.Allowlist); err != nil {
			add("review.allowlist: %v", err)
		}
	default:
		add("review.policy %q: use auto, manual or allowlist", c.Review.Policy)
	}
	for i, kv := range c.Exec.Env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			add("exec.env[%d] %q is not KEY=VALUE", i, kv)
		} else if strings.HasPrefix(k, "FX_") {
			add("exec.env[%d]: %s is reserved for the runner protocol (FX_*)", i, k)
		}
	}
	if c.Exec.Python != "" && !filepath.IsAbs(c.Exec.Python) {
		add("exec.python %q must be an absolute path to an interpreter, such as /usr/bin/python3", c.Exec.Python)
	}
	if c.Privacy.budgeted() {
		if err := c.Privacy.Budget.Validate(); err != nil {
			add("privacy.budget: %s", strings.TrimPrefix(err.Error(), "privacy budget: "))
		}
	} else if c.Privacy.RequireDP {
		add("privacy.require_dp needs privacy.budget (at least epsilon and delta, such as {epsilon: 3, delta: 1e-5}): the site must account for what it requires")
	}
	if c.Privacy.Dataset != "" {
		if err := experiment.ValidateName("privacy.dataset", c.Privacy.Dataset); err != nil {
			add("%v", err)
		}
	}
	if c.RPCTimeout <= 0 {
		add("rpc_timeout must be positive, got %s", c.RPCTimeout)
	}
	if c.Retry.Initial <= 0 || c.Retry.Max < c.Retry.Initial {
		add("retry: want 0 < retry.initial <= retry.max, got %s and %s", c.Retry.Initial, c.Retry.Max)
	}
	if len(problems) > 0 {
		return fmt.Errorf("envoy configuration: %s", strings.Join(problems, "; "))
	}
	return nil
}

// ReadAllowlist reads a file of archive digests: one sha256 (64 hex digits)
// a line; blank lines and text after '#' are ignored, and a line may carry
// a file name after the digest, as sha256sum prints it.
func ReadAllowlist(path string) (map[string]bool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading allow-list: %w", err)
	}
	out := map[string]bool{}
	for i, line := range strings.Split(string(data), "\n") {
		if j := strings.IndexByte(line, '#'); j >= 0 {
			line = line[:j]
		}
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		d := strings.ToLower(fields[0])
		if !isSHA256(d) {
			return nil, fmt.Errorf("allow-list %s line %d: %q is not a sha256 (64 hex digits)", path, i+1, fields[0])
		}
		out[d] = true
	}
	return out, nil
}

func isSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
