// Package aggregator runs one experiment's rounds: it hands tasks to the
// experiment's collaborators by long poll, streams them the global model,
// folds their uploads into the next model as the bytes arrive, closes each
// round under the plan's straggler policy, and checkpoints after every round
// so a restarted aggregator resumes from the next one.
//
// The director starts one Aggregator per running experiment (Config → New →
// Run) and learns what happens through a Sink. Everything durable lives in
// Config.Dir:
//
//	checkpoint.json             the last completed round, the best round, the optimiser's step, digests
//	models/round-NNNNNN.safetensors     the global model after round N (0: the initial model)
//	optimizer/round-NNNNNN.safetensors  server-optimiser state after round N (fedadam, fedyogi, fedadagrad)
//	rounds/round-NNNNNN.json    round N's results and aggregated metrics, and its files' digests
//	discarded/                  the files of rounds a resume could not trust, set aside
//
// Model and round files are written before checkpoint.json names their round,
// each atomically, so a crash at any point leaves a consistent checkpoint;
// digests let a resume tell an intact round from a damaged one (see
// checkpoint.go). Models are kept by the plan's retention, optimiser states
// for the last two rounds.
package aggregator

import (
	"fmt"
	"path/filepath"
)

// TaskResult is one collaborator's report for one task in one round.
type TaskResult struct {
	Collaborator string             `json:"collaborator"`
	Task         string             `json:"task"`
	Samples      int64              `json:"samples"`
	Metrics      map[string]float64 `json:"metrics"`
	// Staleness is, in an asynchronous step (aggregation.mode async), how
	// many steps behind this one the model the result was computed from
	// is; 0 for a fresh result and in synchronous rounds.
	Staleness int `json:"staleness,omitempty"`
}

// RoundSummary is a completed round: every result that counted, and per task
// the sample-weighted mean of each metric over the collaborators.
type RoundSummary struct {
	Round      int                           `json:"round"`
	Results    []TaskResult                  `json:"results"`
	Aggregates map[string]map[string]float64 `json:"aggregates"`
	// Reported lists the collaborators whose train result went into the
	// round's model (in an evaluation, whose scores it counted); Missing
	// those that did not report before it closed.
	Reported []string `json:"reported"`
	Missing  []string `json:"missing,omitempty"`
}

// Best is the best model so far by the plan's best_model rule.
type Best struct {
	Round  int     `json:"round"`
	Metric string  `json:"metric"`
	Value  float64 `json:"value"`
}

// Progress is a live, not durable, view of one collaborator.
type Progress struct {
	Collaborator string
	Round        int
	// Task is the next task whose result is due from it in this round, or ""
	// when it owes nothing.
	Task string
	// LastRound is the last training round whose every task it reported; -1
	// if none. The final validation-only round counts as the last training
	// round, whose model it scores.
	LastRound int
}

// Sink receives what the aggregator does. Calls come from the aggregator's
// goroutines, one at a time, and must not block for long.
type Sink interface {
	// RoundCompleted is called once round's checkpoint is durable.
	RoundCompleted(summary RoundSummary, best *Best)
	// Progress is called when a collaborator takes or finishes a task.
	Progress(p Progress)
	// Paused is called when a resource problem (a full disk, a failing
	// one) stops the experiment short of failing it, with the reason;
	// Resumed when the aggregator got past it and runs again.
	Paused(reason string)
	Resumed()
}

// ModelPath is where the global model after round is kept (0: the initial model).
func ModelPath(dir string, round int) string {
	return filepath.Join(dir, "models", fmt.Sprintf("round-%06d.safetensors", round))
}

// RoundPath is where round's summary is kept.
func RoundPath(dir string, round int) string {
	return filepath.Join(dir, "rounds", fmt.Sprintf("round-%06d.json", round))
}

func checkpointPath(dir string) string { return filepath.Join(dir, "checkpoint.json") }

// legacyOptimizerPath is where fx kept the optimiser state before it kept
// one per round (see optimizerRoundPath).
func legacyOptimizerPath(dir string) string { return filepath.Join(dir, "optimizer.safetensors") }
