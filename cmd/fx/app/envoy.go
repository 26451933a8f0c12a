package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/fx-fl/fx/internal/tracing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/fx-fl/fx/envoy"
	"github.com/fx-fl/fx/internal/config"
)

// envoyFlagKeys maps `fx envoy start` flags to configuration keys.
var envoyFlagKeys = map[string]string{
	"director":        "director.address",
	"server-name":     "director.server_name",
	"work-dir":        "work_dir",
	"review-policy":   "review.policy",
	"allowlist":       "review.allowlist",
	"admin-socket":    "admin_socket",
	"tls-cert":        "tls.cert",
	"tls-key":         "tls.key",
	"tls-ca":          "tls.ca",
	"max-experiments": "max_experiments",
	"shard":           "shard.shard",
	"metrics-listen":  "metrics.listen",
	"otlp-endpoint":   "tracing.endpoint",
}

func newEnvoyCommand(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "envoy",
		Short: "Run a data site's envoy and decide on the experiments offered to it",
		Long: `An envoy runs at a data site. It registers the site's data shard with the
director, heartbeats, reviews the experiments the director offers under the
data owner's policy (auto, manual or an allow-list of archive digests), and
runs a collaborator for each accepted experiment.

Under the manual policy, offers wait until someone at the site runs
'fx envoy approve' or 'fx envoy reject'; 'fx envoy pending' lists them and
'fx envoy inspect' shows one's code; 'fx envoy privacy' shows the privacy
budget and what each dataset spent. These
commands talk to the running envoy through its admin socket, which only the
envoy's user can open.`,
	}
	cmd.AddCommand(newEnvoyStartCommand(opts), newEnvoyStatusCommand(), newEnvoyPendingCommand(), newEnvoyInspectCommand(), newEnvoyDecideCommand(true), newEnvoyDecideCommand(false), newEnvoyPrivacyCommand())
	return cmd
}

// loadEnvoyConfig reads the configuration: defaults, then the file, the
// FX_* environment and the flags the user set.
func loadEnvoyConfig(file string, flags *pflag.FlagSet) (envoy.Config, error) {
	cfg := envoy.DefaultConfig()
	err := config.Load(config.Source{File: file, Flags: flags, FlagKeys: envoyFlagKeys, Environ: envoyEnviron(os.Environ())}, &cfg)
	return cfg, err
}

// envoyEnviron lets FX_DIRECTOR, the variable the researcher's commands
// read, name the director for an envoy too; FX_DIRECTOR_ADDRESS (the
// envoy's own key, director.address) wins when both are set.
func envoyEnviron(environ []string) []string {
	var director string
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "FX_DIRECTOR_ADDRESS":
			return environ
		case "FX_DIRECTOR":
			director = v
		}
	}
	if director == "" {
		return environ
	}
	return append(slices.Clone(environ), "FX_DIRECTOR_ADDRESS="+director)
}

func newEnvoyStartCommand(opts *globalOptions) *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "start",
		Short: "Start the envoy: register, heartbeat, review offers, run collaborators",
		Long: `Start the envoy with the settings of --config (see configs/envoy.yaml), the
FX_* environment (FX_DIRECTOR_ADDRESS, FX_SHARD_PATH, ...) and the flags, in
increasing precedence. It checks the certificate (role envoy; its CN is the
envoy's name), loads the data shard and creates the admin socket before it
contacts the director, and exits with a message naming the problem when one
of them fails. Once started it survives director outages and restarts, and
stops on SIGINT or SIGTERM.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadEnvoyConfig(file, cmd.Flags())
			if err != nil {
				return err
			}
			cfg.Logger = opts.logger(cmd.ErrOrStderr())
			cfg.Version = buildVersion()
			if file != "" {
				if cfg.ConfigFile, err = filepath.Abs(file); err != nil {
					return err
				}
			}
			stopTracing, err := tracing.Setup(cmd.Context(), cfg.Tracing, "envoy", cfg.Version)
			if err != nil {
				return err
			}
			defer stopTracing(context.Background())
			e, err := envoy.New(cfg)
			if err != nil {
				return err
			}
			return e.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVarP(&file, "config", "c", "", "envoy configuration file (YAML)")
	f.String("name", "", "the envoy's name; must equal its certificate's CN (default: the CN)")
	f.String("director", "", "director address, host:port")
	f.String("server-name", "", "name on the director's certificate (default: the host of --director)")
	f.String("work-dir", "", "directory for archives, unpacked experiments and state")
	f.String("review-policy", "", "data owner's policy: auto, manual or allowlist")
	f.String("allowlist", "", "file of accepted archive sha256 digests (policy allowlist)")
	f.String("admin-socket", "", "admin socket path (default <work-dir>/admin/envoy.sock)")
	f.String("tls-cert", "", "the envoy's certificate (PEM)")
	f.String("tls-key", "", "the envoy's private key (PEM)")
	f.String("tls-ca", "", "the federation root certificate (PEM)")
	f.Int("max-experiments", 0, "how many experiments to run at once")
	f.StringSlice("tags", nil, "labels researchers select the data by")
	f.String("shard", "", "the part of the data set this site holds, i/N (shard.shard)")
	f.String("metrics-listen", "", "host:port of the plain-HTTP /metrics, /healthz and /readyz listener (off when empty; keep it on loopback unless a remote Prometheus scrapes it)")
	f.String("otlp-endpoint", "", "host:port of an OpenTelemetry collector (OTLP/gRPC) to send traces to (off when empty; tracing.insecure for one without TLS)")
	return cmd
}

// socketFlags locate a running envoy's admin socket: --socket, or the
// configuration the envoy was started with.
type socketFlags struct {
	socket string
	config string
}

func (s *socketFlags) add(f *pflag.FlagSet) {
	f.StringVar(&s.socket, "socket", "", "the envoy's admin socket")
	f.StringVarP(&s.config, "config", "c", "", "the envoy's configuration file, to find its admin socket")
}

func (s *socketFlags) path() (string, error) {
	if s.socket != "" {
		return s.socket, nil
	}
	if s.config == "" {
		return "", errors.New("give --config (the envoy's configuration file) or --socket (its admin socket)")
	}
	cfg, err := loadEnvoyConfig(s.config, nil)
	if err != nil {
		return "", err
	}
	return cfg.AdminSocketPath(), nil
}

// adminTimeout bounds an admin command.
const adminTimeout = 15 * time.Second

func adminCall(ctx context.Context, s *socketFlags, req envoy.AdminRequest) (envoy.AdminResponse, error) {
	socket, err := s.path()
	if err != nil {
		return envoy.AdminResponse{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, adminTimeout)
	defer cancel()
	return envoy.AdminCall(ctx, socket, req)
}

func newEnvoyStatusCommand() *cobra.Command {
	var sf socketFlags
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the running envoy's connection and experiments",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := adminCall(cmd.Context(), &sf, envoy.AdminRequest{Command: envoy.AdminStatus})
			if err != nil {
				return err
			}
			st := resp.Status
			if st == nil {
				return errors.New("the envoy answered without a status")
			}
			out := cmd.OutOrStdout()
			if output != outputTable {
				return writeValueAs(out, output, st)
			}
			conn := "connected to"
			if !st.Connected {
				conn = "not connected to"
			}
			fmt.Fprintf(out, "envoy %s, %s the director at %s\ndata: %s\nreview policy: %s\n", st.Name, conn, st.Director, st.Data, st.Review)
			if len(st.Experiments) == 0 {
				_, err := fmt.Fprintln(out, "no experiments")
				return err
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "\nID\tNAME\tOWNER\tPHASE\tAGGREGATOR\tREASON")
			for _, x := range st.Experiments {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", x.ID, x.Name, x.Owner, x.Phase, dash(x.Aggregator), dash(x.Reason))
			}
			return tw.Flush()
		},
	}
	sf.add(cmd.Flags())
	addOutputFlag(cmd, &output)
	return cmd
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newEnvoyPendingCommand() *cobra.Command {
	var sf socketFlags
	var output string
	var full bool
	cmd := &cobra.Command{
		Use:   "pending",
		Short: "List the offers awaiting the data owner's decision",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := adminCall(cmd.Context(), &sf, envoy.AdminRequest{Command: envoy.AdminPending})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if output != outputTable {
				if resp.Pending == nil {
					resp.Pending = []envoy.PendingOffer{}
				}
				return writeValueAs(out, output, resp.Pending)
			}
			return printPending(out, resp.Pending, full)
		},
	}
	sf.add(cmd.Flags())
	addOutputFlag(cmd, &output)
	cmd.Flags().BoolVar(&full, "plan", false, "print each offer's whole plan")
	return cmd
}

func printPending(w io.Writer, pending []envoy.PendingOffer, full bool) error {
	if len(pending) == 0 {
		_, err := fmt.Fprintln(w, "no offers await a decision")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tOWNER\tID\tSIZE\tANSWER BY\tSHA256")
	for _, p := range pending {
		by := "-"
		if !p.AnswerBy.IsZero() {
			by = p.AnswerBy.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", p.Name, p.Owner, p.ID, p.ArchiveSize, by, p.ArchiveSHA256)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, p := range pending {
		fmt.Fprintf(w, "\n%s: %s\n", p.Name, p.Summary)
		if full {
			fmt.Fprintf(w, "%s\n", strings.TrimRight(p.Plan, "\n"))
		}
	}
	_, err := fmt.Fprintln(w, "\nread the code with: fx envoy inspect NAME [--extract DIR]\ndecide with: fx envoy approve NAME  |  fx envoy reject NAME --reason '...'")
	return err
}

func newEnvoyDecideCommand(approve bool) *cobra.Command {
	var sf socketFlags
	var reason string
	use, short, verb := "approve NAME", "Accept an offered experiment (name, owner/name or id)", "approved"
	if !approve {
		use, short, verb = "reject NAME", "Decline an offered experiment (name, owner/name or id)", "rejected"
	}
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			command := envoy.AdminApprove
			if !approve {
				command = envoy.AdminReject
			}
			resp, err := adminCall(cmd.Context(), &sf, envoy.AdminRequest{Command: command, Experiment: args[0], Reason: reason})
			if err != nil {
				return err
			}
			d := resp.Decided
			if d == nil {
				return errors.New("the envoy confirmed the decision without naming the offer")
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s %s/%s (id %s, sha256 %s)\n", verb, d.Owner, d.Name, d.ID, d.ArchiveSHA256)
			return err
		},
	}
	sf.add(cmd.Flags())
	cmd.Flags().StringVar(&reason, "reason", "", "why, shown to the researcher")
	return cmd
}
