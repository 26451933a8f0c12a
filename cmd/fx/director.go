package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/director"
	"github.com/fx-fl/fx/internal/config"
	"github.com/fx-fl/fx/pki"
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
aside under data_dir/orphaned.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := loadDirectorSettings(file, cmd.Flags())
			if err != nil {
				return err
			}
			rec, err := director.Recover(director.RecoverConfig{
				DataDir: s.DataDir, StartEmpty: startEmpty, Logger: opts.logger(cmd.ErrOrStderr()),
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

// clientFlags say how an admin command reaches the director.
type clientFlags struct {
	address, serverName string
	cert, key, ca       string
	timeout             time.Duration
}

func (c *clientFlags) add(f *pflag.FlagSet) {
	f.StringVar(&c.address, "director", "localhost:50051", "director address, host:port")
	f.StringVar(&c.serverName, "server-name", "", "name on the director's certificate (default: the host of --director)")
	f.StringVar(&c.cert, "tls-cert", "pki/admin/admin.crt", "the admin's certificate (PEM)")
	f.StringVar(&c.key, "tls-key", "pki/admin/admin.key", "the admin's private key (PEM)")
	f.StringVar(&c.ca, "tls-ca", "pki/admin/ca.crt", "the federation root certificate (PEM)")
	f.DurationVar(&c.timeout, "timeout", 15*time.Second, "bound on the call")
}

// dial connects to the director with the admin's certificate.
func (c *clientFlags) dial() (fxv1.DirectorClient, func(), error) {
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: pki.Files{Cert: c.cert, Key: c.key, CA: c.ca}})
	if err != nil {
		return nil, nil, fmt.Errorf("admin certificate: %w", err)
	}
	conn, err := pki.NewClient(c.address, k, c.serverName)
	if err != nil {
		return nil, nil, fmt.Errorf("director %s: %w", c.address, err)
	}
	return fxv1.NewDirectorClient(conn), func() { conn.Close() }, nil
}

func newDirectorReviewCommand(approve bool) *cobra.Command {
	var cf clientFlags
	var owner, reason, id string
	use, short := "approve NAME", "Approve a PENDING experiment, so it is offered to envoys"
	if !approve {
		use, short = "reject NAME", "Reject a PENDING experiment, ending it as REJECTED"
	}
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Long: short + `.

NAME is the experiment's name; give --owner (the researcher's name) when the
admin did not submit it, or --id instead of NAME. Rejecting needs --reason,
which the researcher sees.`,
		Args: cobra.RangeArgs(0, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ref, err := experimentRef(args, id, owner)
			if err != nil {
				return err
			}
			if !approve && reason == "" {
				return errors.New("--reason is required: say why, for the researcher")
			}
			c, closeConn, err := cf.dial()
			if err != nil {
				return err
			}
			defer closeConn()
			ctx, cancel := context.WithTimeout(cmd.Context(), cf.timeout)
			defer cancel()
			req := &fxv1.ReviewExperimentRequest{Experiment: ref, Reason: reason}
			var e *fxv1.Experiment
			if approve {
				e, err = c.ApproveExperiment(ctx, req)
			} else {
				e, err = c.RejectExperiment(ctx, req)
			}
			if err != nil {
				return statusError(err)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s/%s (id %s) is now %s\n", e.GetOwner(), e.GetName(), e.GetId(), e.GetState())
			return err
		},
	}
	cf.add(cmd.Flags())
	cmd.Flags().StringVar(&owner, "owner", "", "the experiment's owner (default: the admin's own name)")
	cmd.Flags().StringVar(&id, "id", "", "the experiment's id, instead of NAME")
	cmd.Flags().StringVar(&reason, "reason", "", "why; required when rejecting, shown to the researcher")
	return cmd
}

// statusError turns a gRPC status into "Code: message".
func statusError(err error) error {
	if st, ok := status.FromError(err); ok {
		return fmt.Errorf("%s: %s", st.Code(), st.Message())
	}
	return err
}
