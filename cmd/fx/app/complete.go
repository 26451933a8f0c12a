package app

import (
	"context"
	"strings"
	"time"

	"github.com/spf13/cobra"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// Shell completion (`fx completion bash|zsh|fish`): experiment names come
// from the director, with the user's connection settings and a short
// bound; enum values from the protocol.

// completionTimeout bounds the director call behind a completion: a shell
// waiting on a director that is down must not hang.
const completionTimeout = 3 * time.Second

// completeExperiments completes an experiment name argument.
func (o *researcherOptions) completeExperiments(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ctx, cancel := context.WithTimeout(context.Background(), completionTimeout)
	defer cancel()
	cmd.SetContext(ctx)
	o.output = outputTable
	c, err := o.dial(cmd)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
	}
	defer c.Close()
	list, err := c.List(ctx)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
	}
	var names []string
	for _, e := range list {
		if strings.HasPrefix(e.GetName(), toComplete) {
			names = append(names, e.GetName()+"\t"+e.GetState().String())
		}
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}

// completeOutput completes --output.
func completeOutput(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
	return []string{outputTable, outputJSON, outputYAML}, cobra.ShellCompDirectiveNoFileComp
}

// completeStates completes --state with the experiment states.
func completeStates(_ *cobra.Command, _ []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	var out []string
	for n := range len(fxv1.ExperimentState_name) {
		s := fxv1.ExperimentState(n).String()
		if s != "EXPERIMENT_STATE_UNSPECIFIED" && strings.HasPrefix(s, strings.ToUpper(toComplete)) {
			out = append(out, s)
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}

// addCompletion completes the flags every researcher command shares.
func (o *researcherOptions) addCompletion(cmd *cobra.Command) {
	_ = cmd.RegisterFlagCompletionFunc("output", completeOutput)
}
