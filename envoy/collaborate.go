package envoy

import (
	"context"
	"errors"

	"github.com/fx-fl/fx/collaborator"
)

// DefaultCollaborator runs the collaborator package's loop. The aggregator
// saying QUIT is the normal end for this site, whatever the reason it gives
// (finished, cancelled, failed, dropped): the director already knows, so it
// is logged and not reported as a failure.
func DefaultCollaborator(ctx context.Context, spec CollaboratorSpec) error {
	c, err := collaborator.New(collaborator.Config{
		ExperimentID: spec.ExperimentID,
		Name:         spec.Name,
		Address:      spec.Address,
		DialOptions:  spec.DialOptions,
		Runner:       spec.Runner,
		WorkDir:      spec.WorkDir,
		Logger:       spec.Logger,
	})
	if err != nil {
		return err
	}
	err = c.Run(ctx)
	var quit *collaborator.Quit
	if errors.As(err, &quit) {
		if spec.Logger != nil {
			spec.Logger.Info("the aggregator ended the experiment for this site", "reason", quit.Reason)
		}
		return nil
	}
	return err
}
