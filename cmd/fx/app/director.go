package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/fx-fl/fx/internal/tracing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/director"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/config"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// directorFlagKeys maps `fx director start` flags to configuration keys.
var directorFlagKeys = map[string]string{
	"listen":          "listen_address",
	"advertise-host":  "advertise.host",
	"data-dir":        "data_dir",
	"review-policy":   "review_policy",
	"max-concurrent":  "max_concurrent_experiments",
	"tls-cert":        "tls.cert",
	"tls-key":         "tls.key",
	"tls-ca":          "tls.ca",
	"tls-crl":         "tls.crl",
	"aggregator-host": "aggregator.host",
	"launcher":        "launcher",
	"metrics-listen":  "metrics.listen",
	"otlp-endpoint":   "tracing.endpoint",
}

func newDirectorCommand(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "director",
		Short: "Run the federation's director and review experiments",
		Long: `The director is the federation's long-lived service. Envoys register their
data with it and heartbeat; researchers submit experiments to it; it offers
each approved experiment to the envoys its plan selects and starts an
aggregator once enough of them accept.

Under the manual review policy every submitted experiment waits PENDING until
an admin runs 'fx director approve' or 'fx director reject'; 'fx director
inspect' shows its code first.`,
	}
	cmd.AddCommand(newDirectorStartCommand(opts), newDirectorInspectCommand(), newDirectorReviewCommand(true), newDirectorReviewCommand(false), newDirectorRecoverCommand(opts))
	return cmd
}

// loadDirectorSettings reads the settings: defaults, then the file, the
// FX_* environment and the flags the user set.
func loadDirectorSettings(file string, flags *pflag.FlagSet) (director.Settings, error) {
	s := director.DefaultSettings()
	err := config.Load(config.Source{File: file, Flags: flags, FlagKeys: directorFlagKeys}, &s)
	return s, err
}

func newDirectorStartCommand(opts *globalOptions) *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "start",
		Short: "Start the director: serve envoys, researchers and admins",
		Long: `Start the director with the settings of --config (see configs/director.yaml),
the FX_* environment (FX_DATA_DIR, FX_TLS_CERT, ...) and the flags, in
increasing precedence. A bad setting stops it at once with a message naming
the key. It reloads every experiment from data_dir, resumes running ones
from their last completed round, and stops gracefully on SIGINT or SIGTERM.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := loadDirectorSettings(file, cmd.Flags())
			if err != nil {
				return err
			}
			cfg, err := s.Config(opts.logger(cmd.ErrOrStderr()))
			if err != nil {
				return err
			}
			cfg.Version = buildVersion()
			stopTracing, err := tracing.Setup(cmd.Context(), s.Tracing, "director", cfg.Version)
			if err != nil {
				return err
			}
			defer stopTracing(context.Background())
			d, err := director.New(cfg)
			if err != nil {
				return err
			}
			return d.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVarP(&file, "config", "c", "", "director configuration file (YAML)")
	f.String("listen", "", "address to serve on, host:port")
	f.String("advertise-host", "", "host envoys dial to reach aggregators")
	f.String("data-dir", "", "directory for the store, archives and models")
	f.String("review-policy", "", "review of submitted experiments: auto or manual")
	f.Int("max-concurrent", 0, "how many experiments may be offered or running at once")
	f.String("tls-cert", "", "the director's certificate (PEM)")
	f.String("tls-key", "", "the director's private key (PEM)")
	f.String("tls-ca", "", "the federation root certificate (PEM)")
	f.String("tls-crl", "", "the federation's certificate revocation list")
	f.String("aggregator-host", "", "interface aggregators listen on")
	f.String("launcher", "", "how aggregators run: inprocess (inside the director, the default), process (a child 'fx aggregator run' per experiment: its own memory, restarted from its checkpoint if it dies) or kubernetes (a Job and Service per experiment in a cluster: the kubernetes block of the config file)")
	f.String("metrics-listen", "", "host:port of the plain-HTTP /metrics, /healthz and /readyz listener (off when empty; keep it on loopback unless a remote Prometheus scrapes it)")
	f.String("otlp-endpoint", "", "host:port of an OpenTelemetry collector (OTLP/gRPC) to send traces to (off when empty; tracing.insecure for one without TLS)")
	return cmd
}

func newDirectorRecoverCommand(opts *globalOptions) *cobra.Command {
	var file string
	var startEmpty bool
	cmd := &cobra.Command{
		Use:   "recover",
		Short: "Restore the director's store from its newest good snapshot",
		Long: `Run this, with the director stopped, when 'fx director start' refuses to
start because its store (data_dir/director.db) is damaged, empty, missing or
does not match the experiments under data_dir.

It sets the store aside (director.db.set-aside-TIME) and copies in its place
the newest snapshot under data_dir/snapshots that passes a full check (the
director takes one at every start, every snapshots.interval and at every
clean stop), then reconciles it with the experiment directories: a
directory the snapshot does not know (submitted after it) moves to
data_dir/orphaned, a record whose directory is gone is deleted if the
experiment had ended and failed otherwise, and an experiment whose
aggregator started after the snapshot is RUNNING again. An intact store that
matches is kept and only reconciled. Nothing is deleted. It prints what it
did; then start the director.

Without a good snapshot it changes nothing, unless --start-empty: then the
director starts with an empty store and every experiment directory is set
aside under data_dir/orphaned.

With store.kind postgres there are no snapshots and it refuses: restore the
database from its backups with PostgreSQL's tools (pg_restore, point-in-time
recovery).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := loadDirectorSettings(file, cmd.Flags())
			if err != nil {
				return err
			}
			rec, err := director.Recover(director.RecoverConfig{
				DataDir: s.DataDir, PostgresDSN: s.PostgresDSN(), StartEmpty: startEmpty, Logger: opts.logger(cmd.ErrOrStderr()),
			})
			if rec != nil {
				printRecovery(cmd.OutOrStdout(), s.DataDir, rec)
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVarP(&file, "config", "c", "", "director configuration file (YAML), for its data_dir")
	f.String("data-dir", "", "the director's data directory")
	f.BoolVar(&startEmpty, "start-empty", false, "without a good snapshot, start with an empty store and set every experiment directory aside")
	return cmd
}

func printRecovery(w io.Writer, dataDir string, rec *director.Recovery) {
	switch {
	case rec.Restored != "":
		fmt.Fprintf(w, "restored the store of %s from %s\n", dataDir, rec.Restored)
	case rec.StartedEmpty:
		fmt.Fprintf(w, "no good snapshot: the store of %s starts empty (--start-empty)\n", dataDir)
	default:
		fmt.Fprintf(w, "the store of %s is intact; kept it\n", dataDir)
	}
	if rec.SetAside != "" {
		fmt.Fprintf(w, "the previous store is kept as %s\n", rec.SetAside)
	}
	for _, a := range rec.Actions {
		fmt.Fprintf(w, "- %s\n", a)
	}
	if len(rec.Actions) == 0 {
		fmt.Fprintln(w, "every experiment matches its directory")
	}
}

// adminConnSettings are an admin command's settings before any flag,
// variable or profile: the admin's files in scripts/pki-bootstrap.sh's
// layout, so an operator in the directory it ran in needs no settings.
func adminConnSettings() connSettings {
	s := defaultConnSettings()
	s.Cert = filepath.Join("pki", "admin", "admin.crt")
	s.Key = filepath.Join("pki", "admin", "admin.key")
	s.CA = filepath.Join("pki", "admin", "ca.crt")
	return s
}

const adminConnHelp = `Connection settings are those of 'fx experiment' (--director, --server-name,
--cert, --key, --ca, --timeout; FX_DIRECTOR, FX_CERT, ...; a --profile file),
with an admin's certificate: by default pki/admin/admin.crt, admin.key and
pki/admin/ca.crt, as scripts/pki-bootstrap.sh writes them.`

// adminOptions registers on cmd the connection flags every command that
// talks to the director shares. --tls-cert, --tls-key and --tls-ca, the
// names these commands had, still work.
func adminOptions(cmd *cobra.Command) *researcherOptions {
	o := &researcherOptions{defaults: adminConnSettings}
	o.addPersistent(cmd.Flags())
	o.addCompletion(cmd)
	cmd.Flags().SetNormalizeFunc(func(_ *pflag.FlagSet, name string) pflag.NormalizedName {
		if n, ok := strings.CutPrefix(name, "tls-"); ok {
			name = n
		}
		return pflag.NormalizedName(name)
	})
	return o
}

// adminRef names the experiment an admin command is about: --id, OWNER/NAME,
// NAME with --owner, or NAME alone, which is whoever's experiment carries
// that name: the PENDING one when several do, and an error listing them
// when that is not enough to tell.
func adminRef(ctx context.Context, c *experiment.Client, args []string, id, owner string) (*fxv1.ExperimentRef, error) {
	ref, err := experimentRef(args, id, owner)
	if err != nil {
		return nil, usageError{err}
	}
	if ref.Id != "" || ref.Owner != "" {
		return ref, nil
	}
	if o, n, ok := strings.Cut(ref.Name, "/"); ok {
		return &fxv1.ExperimentRef{Owner: o, Name: n}, nil
	}
	all, err := c.ListOf(ctx, "")
	if err != nil {
		return nil, err
	}
	var named, pending []*fxv1.Experiment
	for _, e := range all {
		if e.GetName() == ref.Name {
			named = append(named, e)
			if e.GetState() == fxv1.ExperimentState_PENDING {
				pending = append(pending, e)
			}
		}
	}
	switch {
	case len(pending) == 1:
		named = pending
	case len(named) == 0:
		return nil, &experiment.StatusError{Op: "experiment " + ref.Name, Status: status.New(codes.NotFound, "no researcher has an experiment of that name (fx experiment list shows them all to an admin)")}
	}
	if len(named) > 1 {
		var which []string
		for _, e := range named {
			which = append(which, fmt.Sprintf("%s/%s (%s)", e.GetOwner(), e.GetName(), e.GetState()))
		}
		return nil, usageError{fmt.Errorf("%d experiments are called %s: name one as OWNER/NAME: %s", len(named), ref.Name, strings.Join(which, ", "))}
	}
	return &fxv1.ExperimentRef{Id: named[0].GetId()}, nil
}

func newDirectorReviewCommand(approve bool) *cobra.Command {
	var owner, reason, id string
	use, short := "approve NAME", "Approve a PENDING experiment, so it is offered to envoys"
	if !approve {
		use, short = "reject NAME", "Reject a PENDING experiment, ending it as REJECTED"
	}
	var o *researcherOptions
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Long: short + `.

NAME is the experiment's name, whoever submitted it (the PENDING one when
researchers used the same name); OWNER/NAME or --owner picks one
researcher's, --id one experiment. Rejecting needs --reason, which the
researcher sees.

` + adminConnHelp,
		Example: `  fx director approve fashion-mlp
  fx director reject alice/fashion-mlp --reason "trains on every site's GPU for a week"`,
		Args: cobra.RangeArgs(0, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !approve && reason == "" {
				return usageError{errors.New("--reason is required: say why, for the researcher")}
			}
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			ref, err := adminRef(cmd.Context(), c, args, id, owner)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 15*time.Second)
			defer cancel()
			req := &fxv1.ReviewExperimentRequest{Experiment: ref, Reason: reason}
			var e *fxv1.Experiment
			if approve {
				e, err = c.RPC().ApproveExperiment(ctx, req)
			} else {
				e, err = c.RPC().RejectExperiment(ctx, req)
			}
			if err != nil {
				return statusError(err)
			}
			if o.structured() {
				return o.write(cmd.OutOrStdout(), e)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s/%s (id %s) is now %s\n", e.GetOwner(), e.GetName(), e.GetId(), e.GetState())
			return err
		},
	}
	o = adminOptions(cmd)
	cmd.Flags().StringVar(&owner, "owner", "", "the experiment's owner, when researchers used the same name")
	cmd.Flags().StringVar(&id, "id", "", "the experiment's id, instead of NAME")
	cmd.Flags().StringVar(&reason, "reason", "", "why; required when rejecting, shown to the researcher")
	return cmd
}

// statusError shows a gRPC error as "Code: message" and keeps its status,
// which decides the exit status (3 for NotFound, 5 for PermissionDenied).
func statusError(err error) error {
	if st, ok := status.FromError(err); ok {
		return grpcError{st}
	}
	return err
}

type grpcError struct{ st *status.Status }

func (e grpcError) Error() string              { return fmt.Sprintf("%s: %s", e.st.Code(), e.st.Message()) }
func (e grpcError) GRPCStatus() *status.Status { return e.st }
