package app

import (
	"errors"

	"github.com/spf13/cobra"

	"github.com/fx-fl/fx/director"
)

func newAggregatorCommand(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "aggregator",
		Short: "Run one experiment's aggregator as a process of its own",
		Long: `An aggregator runs one experiment's rounds. By default (director setting
launcher: inprocess) each runs inside the director. With launcher: process
the director starts 'fx aggregator run' per running experiment instead, and
starts it again from its checkpoint if it dies; people do not run it by hand.
See docs/scaling.md, "Launchers".`,
	}
	cmd.AddCommand(newAggregatorRunCommand(opts))
	return cmd
}

func newAggregatorRunCommand(opts *globalOptions) *cobra.Command {
	var spec string
	cmd := &cobra.Command{
		Use:   "run --spec FILE",
		Short: "Run the aggregator a director's launch spec describes",
		Long: `Run the aggregator of one experiment from the launch spec FILE the director
wrote (data_dir/experiments/ID/aggregator.spec.json): the plan, the
participants and the sample counts they registered, the initial model, the
checkpoint directory, the socket or address to serve on, the certificate to
present (the director's) and the director to report to.

It serves the experiment's collaborators, reports its progress and every
completed round to the director over mutual TLS, and resumes from the
checkpoint directory when started again. When the experiment ends it writes
the outcome (finished, or failed with the reason) beside the spec and exits
0; on SIGTERM it stops, the experiment still running, and exits 0. Any other
exit is a crash, after which the director starts it again.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if spec == "" {
				return usageError{errors.New("--spec is required: the launch spec the director wrote")}
			}
			return director.RunAggregatorProcess(cmd.Context(), spec, opts.logger(cmd.ErrOrStderr()))
		},
	}
	cmd.Flags().StringVar(&spec, "spec", "", "the launch spec (JSON) the director wrote")
	return cmd
}
