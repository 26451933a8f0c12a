package app

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/experiment"
)

// Exit statuses by class of failure, so that scripts can tell a typo from
// a director that is down. They are listed in `fx --help`.
const (
	exitFailed      = 1   // anything else: the operation failed (an experiment that did not finish, a refused plan...)
	exitUsage       = 2   // the command line is wrong: an unknown command or flag, missing arguments
	exitNotFound    = 3   // the experiment, envoy or file named does not exist
	exitUnreachable = 4   // the director (or envoy admin socket) could not be reached
	exitDenied      = 5   // the certificate was refused, or its role may not do this
	exitInterrupted = 130 // Ctrl-C
)

const exitCodesHelp = `Exit status: 0 success; 1 failed; 2 usage (unknown command or flag, bad
arguments); 3 not found; 4 the director is unreachable; 5 denied (the
certificate is refused or its role may not do this); 130 interrupted.`

// usageError is a mistake in the command line.
type usageError struct{ error }

func (u usageError) Unwrap() error { return u.error }

// exitCode classifies an error for the process's exit status.
func exitCode(err error) int {
	var u usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &u), strings.HasPrefix(err.Error(), "unknown command "), strings.HasPrefix(err.Error(), "unknown flag"):
		return exitUsage
	case errors.Is(err, context.Canceled):
		return exitInterrupted
	case errors.Is(err, experiment.ErrUnreachable):
		return exitUnreachable
	}
	if st, ok := status.FromError(err); ok {
		switch st.Code() {
		case codes.NotFound:
			return exitNotFound
		case codes.Unavailable, codes.DeadlineExceeded:
			return exitUnreachable
		case codes.PermissionDenied, codes.Unauthenticated:
			return exitDenied
		}
	}
	if errors.Is(err, experiment.ErrWrongRole) {
		return exitDenied
	}
	return exitFailed
}

// finishTree applies what every command shares: a command line error is a
// usage error (exit 2); a group command given an unknown subcommand fails
// with a suggestion rather than printing its help and succeeding; list and
// remove also answer to ls and rm.
func finishTree(c *cobra.Command) {
	for _, sub := range c.Commands() {
		finishTree(sub)
	}
	c.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	switch {
	case c.HasSubCommands() && c.Run == nil && c.RunE == nil:
		c.Args = unknownSubcommand
		c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
	case c.Args != nil:
		check := c.Args
		c.Args = func(cmd *cobra.Command, args []string) error {
			if err := check(cmd, args); err != nil {
				return usageError{fmt.Errorf("%w\nRun '%s --help' for usage", err, cmd.CommandPath())}
			}
			return nil
		}
	}
	switch c.Name() {
	case "list":
		c.Aliases = append(c.Aliases, "ls")
	case "remove":
		c.Aliases = append(c.Aliases, "rm")
	}
}

// unknownSubcommand refuses arguments to a group command: they can only be
// a mistyped subcommand.
func unknownSubcommand(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
	if cmd.SuggestionsMinimumDistance <= 0 {
		cmd.SuggestionsMinimumDistance = 2 // cobra's default, which it sets on the root only
	}
	if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return usageError{fmt.Errorf("%s\nRun '%s --help' for its commands", msg, cmd.CommandPath())}
}
