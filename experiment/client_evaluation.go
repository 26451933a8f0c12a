package experiment

import (
	"context"
	"fmt"
	"slices"
	"strings"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// Evaluation is what an evaluation (Plan.Evaluation) found: each site's
// score of the given model on its validation data, and the overall score,
// the mean of the sites' weighted by their samples.
type Evaluation struct {
	// Sites holds one event per site that reported, by envoy name.
	Sites []*fxv1.MetricEvent
	// Overall is the aggregate over the sites (its Collaborator is empty,
	// its Samples their sum); nil until the evaluation's round completed.
	Overall *fxv1.MetricEvent
}

// EvaluationOf picks an evaluation's results out of its metric events: the
// aggregated_model_validation of its one round.
func EvaluationOf(events []*fxv1.MetricEvent) *Evaluation {
	ev := &Evaluation{}
	for _, e := range events {
		if e.GetRound() != 1 || e.GetTask() != runner.TaskAggregatedValidation {
			continue
		}
		if e.GetCollaborator() == "" {
			ev.Overall = e
		} else {
			ev.Sites = append(ev.Sites, e)
		}
	}
	slices.SortFunc(ev.Sites, func(a, b *fxv1.MetricEvent) int { return strings.Compare(a.GetCollaborator(), b.GetCollaborator()) })
	return ev
}

// Evaluation returns the results of an evaluation that has ended; an
// experiment that trains, or one still running, is an error that says
// where to look instead.
func (c *Client) Evaluation(ctx context.Context, name string) (*Evaluation, error) {
	e, err := c.Get(ctx, name)
	if err != nil {
		return nil, err
	}
	plan, err := ParseStoredPlan([]byte(e.GetPlanYaml()))
	if err != nil {
		return nil, fmt.Errorf("experiment %s: %w", name, err)
	}
	if !plan.Evaluation() {
		return nil, fmt.Errorf("experiment %s trains (its tasks include train), it is not an evaluation: its metrics (fx experiment metrics) hold its validations", name)
	}
	if !Ended(e.GetState()) {
		return nil, fmt.Errorf("experiment %s is %s: its evaluation is known once it has ended (fx experiment watch follows it)", name, e.GetState())
	}
	var events []*fxv1.MetricEvent
	for ev, err := range c.Metrics(ctx, name, 0) {
		if err != nil {
			return nil, err
		}
		events = append(events, ev)
	}
	return EvaluationOf(events), nil
}
