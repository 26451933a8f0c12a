package app

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

func newEnvoysCommand() *cobra.Command {
	o := &researcherOptions{}
	cmd := &cobra.Command{
		Use:   "envoys",
		Short: "See the federation's data sites: which envoys hold what data",
		Long: `See the envoys registered with the director, the datasets they describe
(tags, shapes, sample counts; never the data) and whether they are online:
what a plan's participants section can select.

` + connFlagsHelp,
		Example: `  fx envoys list
  fx envoys list --tags fashion-mnist --online
  fx envoys search --tags fashion-mnist --sample-shape 28,28`,
	}
	o.addPersistent(cmd.PersistentFlags())
	cmd.AddCommand(newEnvoysListCommand(o), newEnvoysSearchCommand(o))
	o.addCompletion(cmd)
	return cmd
}

func newEnvoysListCommand(o *researcherOptions) *cobra.Command {
	var tags []string
	var online bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the registered envoys and their datasets",
		Long: `List the envoys registered with the director: online or not, when last seen,
their dataset's tags, shapes and sample counts, and the experiments they take
part in now. --tags keeps the envoys whose dataset carries every tag given.`,
		Example: `  fx envoys list
  fx envoys list --tags fashion-mnist,train --online
  fx envoys list --output json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			envoys, err := c.Envoys(cmd.Context(), tags...)
			if err != nil {
				return err
			}
			if online {
				kept := envoys[:0]
				for _, e := range envoys {
					if e.GetOnline() {
						kept = append(kept, e)
					}
				}
				envoys = kept
			}
			out := cmd.OutOrStdout()
			if o.structured() {
				return o.write(out, &fxv1.ListEnvoysResponse{Envoys: envoys})
			}
			return printEnvoys(out, envoys)
		},
	}
	cmd.Flags().StringSliceVar(&tags, "tags", nil, "only envoys whose dataset carries all these tags (comma-separated)")
	cmd.Flags().BoolVar(&online, "online", false, "only envoys that are online")
	return cmd
}

func printEnvoys(w io.Writer, envoys []*fxv1.EnvoyInfo) error {
	if len(envoys) == 0 {
		_, err := fmt.Fprintln(w, "no envoys")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tONLINE\tLAST SEEN\tTAGS\tSAMPLE\tTARGET\tTRAIN\tVALID\tEXPERIMENTS")
	for _, e := range envoys {
		s := e.GetShard()
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", e.GetName(), yesNo(e.GetOnline()), formatTime(e.GetLastSeen().AsTime()),
			orDash(strings.Join(s.GetTags(), ",")), formatShape(s.GetSampleShape()), formatShape(s.GetTargetShape()),
			s.GetTrainSamples(), s.GetValidSamples(), orDash(strings.Join(e.GetExperiments(), ",")))
	}
	return tw.Flush()
}

func newEnvoysSearchCommand(o *researcherOptions) *cobra.Command {
	var tags []string
	var sample, target []int
	cmd := &cobra.Command{
		Use:   "search",
		Short: "Find the online datasets a plan would select",
		Long: `Find the online envoys whose dataset carries every tag given and, when given,
has exactly the sample and target shapes: where a plan with the same
participants.tags, sample_shape and target_shape would find data.`,
		Example: `  fx envoys search --tags fashion-mnist --sample-shape 28,28`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			matches, err := c.Search(cmd.Context(), tags, toInt64s(sample), toInt64s(target))
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if o.structured() {
				return o.write(out, &fxv1.SearchDatasetsResponse{Matches: matches})
			}
			if len(matches) == 0 {
				_, err := fmt.Fprintln(out, "no matching datasets")
				return err
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ENVOY\tONLINE\tTAGS\tSAMPLE\tTARGET\tTRAIN\tVALID\tDESCRIPTION")
			for _, m := range matches {
				s := m.GetShard()
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", m.GetEnvoy(), yesNo(m.GetOnline()), orDash(strings.Join(s.GetTags(), ",")),
					formatShape(s.GetSampleShape()), formatShape(s.GetTargetShape()), s.GetTrainSamples(), s.GetValidSamples(), orDash(s.GetDescription()))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringSliceVar(&tags, "tags", nil, "tags the dataset must all carry (comma-separated)")
	cmd.Flags().IntSliceVar(&sample, "sample-shape", nil, "the shape of one sample, such as 28,28")
	cmd.Flags().IntSliceVar(&target, "target-shape", nil, "the shape of one target")
	return cmd
}

func toInt64s(v []int) []int64 {
	out := make([]int64, len(v))
	for i, x := range v {
		out[i] = int64(x)
	}
	return out
}

// formatShape is "[28,28]"; a scalar's empty shape is "[]".
func formatShape(s []int64) string {
	parts := make([]string, len(s))
	for i, d := range s {
		parts[i] = strconv.FormatInt(d, 10)
	}
	return "[" + strings.Join(parts, ",") + "]"
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
