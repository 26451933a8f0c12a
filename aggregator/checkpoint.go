package aggregator

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"

	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/tensor"
)

// checkpoint is the durable record of an aggregator's progress. It is written
// last after a round, once the round's model and summary are on disk, so the
// round it names is always complete.
type checkpoint struct {
	ExperimentID string `json:"experiment_id"`
	// Completed is the last completed round; 0 when only the initial model exists.
	Completed int   `json:"completed"`
	Best      *Best `json:"best,omitempty"`
	// OptimizerStep counts server-optimiser steps taken (fedadam & co.).
	OptimizerStep int `json:"optimizer_step,omitempty"`
}

func readCheckpoint(dir string) (*checkpoint, error) {
	data, err := os.ReadFile(checkpointPath(dir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read checkpoint: %w", err)
	}
	var c checkpoint
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("checkpoint %s is corrupt: %w", checkpointPath(dir), err)
	}
	return &c, nil
}

func writeCheckpoint(dir string, c *checkpoint) error {
	return atomicfile.WriteJSON(checkpointPath(dir), c)
}

// writeModel stores a round's global model.
func writeModel(dir string, round int, m tensor.Model) error {
	path := ModelPath(dir, round)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return tensor.WriteFile(path, m, map[string]string{"fx.round": fmt.Sprint(round)})
}

// History returns the completed rounds kept in an aggregator directory, in
// order, and the best model so far. A directory without a checkpoint has no
// history. The director uses it to rebuild an experiment's metric log after a
// restart: it is derived from the same files the aggregator resumes from, so
// nothing is lost or repeated.
func History(dir string) ([]RoundSummary, *Best, error) {
	c, err := readCheckpoint(dir)
	if err != nil || c == nil {
		return nil, nil, err
	}
	out := make([]RoundSummary, 0, c.Completed)
	for r := 1; r <= c.Completed; r++ {
		data, err := os.ReadFile(RoundPath(dir, r))
		if err != nil {
			return nil, nil, fmt.Errorf("round %d summary: %w", r, err)
		}
		var s RoundSummary
		if err := json.Unmarshal(data, &s); err != nil {
			return nil, nil, fmt.Errorf("round %d summary %s is corrupt: %w", r, RoundPath(dir, r), err)
		}
		out = append(out, s)
	}
	return out, c.Best, nil
}

// aggregateMetrics is, per task, the sample-weighted mean of each metric over
// the results that reported it. A task whose results all have zero samples is
// averaged unweighted.
func aggregateMetrics(results []TaskResult) map[string]map[string]float64 {
	type term struct{ value, weight float64 }
	terms := map[string]map[string][]term{}
	for _, r := range results {
		for k, v := range r.Metrics {
			if terms[r.Task] == nil {
				terms[r.Task] = map[string][]term{}
			}
			terms[r.Task][k] = append(terms[r.Task][k], term{v, float64(r.Samples)})
		}
	}
	out := map[string]map[string]float64{}
	for task, metrics := range terms {
		out[task] = map[string]float64{}
		for k, ts := range metrics {
			var total float64
			for _, t := range ts {
				total += t.weight
			}
			// Each weight is made a fraction before it multiplies, so finite
			// metrics give a finite mean however many samples the results
			// claim: Σ w·v would overflow for 2^62 samples of a loss of 1e300.
			// The exact mean lies within the values' range; the clamp takes
			// back only what rounding carries past the largest float64.
			var mean float64
			for _, t := range ts {
				frac := 1 / float64(len(ts))
				if total > 0 {
					frac = t.weight / total
				}
				mean += frac * t.value
			}
			out[task][k] = max(-math.MaxFloat64, min(math.MaxFloat64, mean))
		}
	}
	return out
}
