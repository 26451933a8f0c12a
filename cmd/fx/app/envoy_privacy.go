package app

import (
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/fx-fl/fx/envoy"
)

func newEnvoyPrivacyCommand() *cobra.Command {
	var sf socketFlags
	var output string
	var noise []float64
	cmd := &cobra.Command{
		Use:   "privacy",
		Short: "Show the site's privacy budget and ledger: ε spent per dataset and experiment, and what is left",
		Long: `Shows the running envoy's differential-privacy policy and its ledger: for
each dataset, the ε spent (at the budget's δ) over every experiment that
trained on it, each experiment's rounds and share, and how many more rounds
fit at some noise multipliers (--noise, else the budget's minimum, those
used so far, 5 and 10). docs/privacy.md explains the numbers.`,
		Example: `  fx envoy privacy --config configs/envoy.yaml
  fx envoy privacy --config configs/envoy.yaml --noise 4 --noise 8
  fx envoy privacy --config configs/envoy.yaml --output json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := adminCall(cmd.Context(), &sf, envoy.AdminRequest{Command: envoy.AdminPrivacy, Noise: noise})
			if err != nil {
				return err
			}
			st := resp.Privacy
			if st == nil {
				return errors.New("the envoy answered without its privacy status (is it older than this fx?)")
			}
			if output != outputTable {
				return writeValueAs(cmd.OutOrStdout(), output, st)
			}
			return printPrivacy(cmd.OutOrStdout(), st)
		},
	}
	sf.add(cmd.Flags())
	addOutputFlag(cmd, &output)
	cmd.Flags().Float64SliceVar(&noise, "noise", nil, "noise multiplier σ to tell the rounds left at (repeat, or comma-separated)")
	return cmd
}

func printPrivacy(w io.Writer, st *envoy.PrivacyStatus) error {
	switch b := st.Budget; {
	case b == nil:
		fmt.Fprintf(w, "no privacy budget (privacy.budget): plans with privacy.dp are clipped and noised as they ask, not accounted; ε below is at δ = %g\n", st.Delta)
	default:
		limits := fmt.Sprintf("noise multiplier at least %v", b.MinNoise)
		if b.MaxClip > 0 {
			limits += fmt.Sprintf(", clip norm at most %v", b.MaxClip)
		}
		required := "optional"
		if st.RequireDP {
			required = "required for every experiment"
		}
		fmt.Fprintf(w, "budget: ε = %v at δ = %g per dataset; %s; differential privacy %s\n", b.Epsilon, b.Delta, limits, required)
	}
	fmt.Fprintf(w, "ledger: %s\n", st.Ledger)
	for _, d := range st.Datasets {
		what := "dataset " + d.Name
		if d.Current {
			what += " (this envoy's data)"
		}
		fmt.Fprintf(w, "\n%s: ε %s spent", what, eps(d.Spent))
		if d.Left != nil {
			fmt.Fprintf(w, ", %s left", eps(*d.Left))
		}
		fmt.Fprintln(w)
		if len(d.Experiments) == 0 {
			fmt.Fprintln(w, "no rounds charged")
		} else {
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "EXPERIMENT\tID\tROUNDS\tσ\tC\tε\tLAST CHARGED")
			for _, x := range d.Experiments {
				rounds := strconv.Itoa(x.Rounds)
				if x.Rounds > 0 {
					rounds += fmt.Sprintf(" (%d–%d)", x.FirstRound, x.LastRound)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%v\t%s\t%s\n", dash(x.Name), x.ID, rounds, x.Noise, x.Clip, eps(x.Epsilon), x.Last.Local().Format(time.DateTime))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
		}
		if len(d.RoundsLeft) > 0 {
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "σ\tROUNDS LEFT")
			for _, r := range d.RoundsLeft {
				left := strconv.Itoa(r.Rounds)
				if r.Rounds == math.MaxInt {
					left = "any"
				}
				if r.Refused != "" {
					left = "none: " + r.Refused
				}
				fmt.Fprintf(tw, "%v\t%s\n", r.Noise, left)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
		}
	}
	return nil
}

// eps prints an ε to three significant digits.
func eps(x float64) string { return strconv.FormatFloat(x, 'g', 3, 64) }
