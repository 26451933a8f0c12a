package app

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/fx-fl/fx/dashboard"
)

// newDashboardCommand is `fx dashboard`: a local, read-only web UI on the
// researcher's connection to the director (see package dashboard).
func newDashboardCommand(opts *globalOptions) *cobra.Command {
	o := &researcherOptions{}
	var listen string
	var allowRemote bool
	cmd := &cobra.Command{
		Use:   "dashboard",
		Short: "Serve a local, read-only web UI: envoys, experiments, live metrics, models",
		Long: `Serve a web page on this machine that shows the federation's envoys, your
experiments with their rounds and participants, one experiment's accuracy and
loss round by round as they arrive, and links to download its best and latest
models. Open the URL it prints; Ctrl-C stops it.

The dashboard talks to the director exactly as 'fx experiment' does, with your
certificate and the same connection settings, and only reads: it cannot
submit, cancel or remove anything. Since whoever reaches it acts as you, it
listens on 127.0.0.1 only (--allow-remote lifts that), answers only requests
addressed to that address (a guard against DNS rebinding), and serves its
page with a Content-Security-Policy that allows no script but its own.

` + connFlagsHelp,
		Example: `  fx dashboard
  fx dashboard --listen 127.0.0.1:0          # any free port
  ssh -L 8642:127.0.0.1:8642 workstation     # from another machine, then open http://127.0.0.1:8642/`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := dashboard.CheckListen(listen, allowRemote); err != nil {
				return usageError{fmt.Errorf("--listen: %w", err)}
			}
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			l, err := net.Listen("tcp", listen)
			if errors.Is(err, syscall.EADDRINUSE) {
				return fmt.Errorf("--listen %s: the port is taken (another dashboard?): choose another, or --listen 127.0.0.1:0 for any free one: %w", listen, err)
			}
			if err != nil {
				return fmt.Errorf("--listen %s: %w", listen, err)
			}
			s, err := dashboard.New(dashboard.Config{
				Client: c,
				Addr:   l.Addr().String(),
				Logger: opts.logger(cmd.ErrOrStderr()).Named("dashboard"),
			})
			if err != nil {
				l.Close()
				return err
			}
			id := c.Identity()
			fmt.Fprintf(cmd.OutOrStdout(), "fx dashboard: http://%s/ (director %s, as %s %s; read-only; Ctrl-C stops it)\n", l.Addr(), c.Address(), id.Role, id.Name)
			return s.Serve(cmd.Context(), l)
		},
	}
	// The connection flags of `fx experiment`, without --output: the
	// dashboard prints nothing for scripts.
	conn := pflag.NewFlagSet("connection", pflag.ContinueOnError)
	o.addPersistent(conn)
	conn.VisitAll(func(f *pflag.Flag) {
		if f.Name != "output" {
			cmd.Flags().AddFlag(f)
		}
	})
	cmd.Flags().StringVar(&listen, "listen", dashboard.DefaultListen, "address to serve the dashboard on, host:port (port 0: any free one)")
	cmd.Flags().BoolVar(&allowRemote, "allow-remote", false, "allow a --listen address other machines can reach: whoever reaches it acts with your certificate")
	return cmd
}
