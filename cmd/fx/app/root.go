package app

import (
	"fmt"
	"io"
	"runtime"
	"strings"

	"github.com/fx-fl/fx/internal/version"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
)

// globalOptions are the flags every command shares.
type globalOptions struct {
	logLevel string
	logJSON  bool
}

func newRootCommand() *cobra.Command {
	opts := &globalOptions{}
	root := &cobra.Command{
		Use:   "fx",
		Short: "Federated learning across institutions that cannot share data",
		Long: `fx runs federated-learning experiments across data sites without moving the data.

A long-lived director accepts experiments from researchers and health checks
from envoys at the data sites; for each approved experiment it starts an
aggregator; each envoy runs a collaborator that trains on its local data.
Every connection is gRPC over mutual TLS, and every party is known by its
certificate.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := parseLevel(opts.logLevel); err != nil {
				return err
			}
			return nil
		},
	}
	root.PersistentFlags().StringVar(&opts.logLevel, "log-level", "info", "log level: trace, debug, info, warn or error")
	root.PersistentFlags().BoolVar(&opts.logJSON, "log-json", false, "log one JSON object per line, for machines")
	root.AddCommand(newVersionCommand())
	root.AddCommand(newEnvoyCommand(opts))
	root.AddCommand(newPKICommand())
	root.AddCommand(newDirectorCommand(opts))
	root.AddCommand(newAggregatorCommand(opts))
	root.AddCommand(newExperimentCommand())
	root.AddCommand(newEnvoysCommand())
	root.AddCommand(newQuickstartCommand(opts))
	root.AddCommand(newDashboardCommand(opts))
	root.Version = buildVersion()
	root.SetVersionTemplate("fx {{.Version}}\n")
	root.Long += "\n\n" + exitCodesHelp
	finishTree(root)
	return root
}

// logger builds the root logger from the global flags; components take
// named sub-loggers from it.
func (o *globalOptions) logger(w io.Writer) hclog.Logger {
	level, _ := parseLevel(o.logLevel)
	return hclog.New(&hclog.LoggerOptions{
		Name:       "fx",
		Level:      level,
		JSONFormat: o.logJSON,
		Output:     w,
	})
}

func parseLevel(s string) (hclog.Level, error) {
	level := hclog.LevelFromString(s)
	if level == hclog.NoLevel || strings.TrimSpace(s) == "" {
		return hclog.NoLevel, fmt.Errorf("--log-level %q: use trace, debug, info, warn or error", s)
	}
	return level, nil
}

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the fx version, its commit and date, the Go version and the platform",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "fx %s, %s/%s\n", version.Get(), runtime.GOOS, runtime.GOARCH)
			return err
		},
	}
}

// buildVersion is this build's version: see internal/version.
func buildVersion() string { return version.Get().Version }
