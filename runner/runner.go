// Package runner defines how a collaborator runs an experiment's tasks at a site:
// the Runner interface, the task names a plan may list, and the result a task
// returns. Implementations live in sub-packages: builtin (plain-Go models) and
// exec (the experiment's own command, through a language-neutral protocol).
package runner

import (
	"context"
	"fmt"

	"github.com/fx-fl/fx/tensor"
)

// The tasks a plan may list, in the order a round usually runs them.
const (
	// TaskAggregatedValidation validates the round's global model on local data.
	TaskAggregatedValidation = "aggregated_model_validation"
	// TaskTrain trains the global model on local data and returns new weights.
	TaskTrain = "train"
	// TaskLocalValidation validates the weights the train task just produced.
	TaskLocalValidation = "locally_tuned_model_validation"
)

// IsTrain reports whether a task name is the training task, whose result
// carries a model; every other known task only returns metrics.
func IsTrain(task string) bool { return task == TaskTrain }

// ValidateTaskName refuses task names fx does not know.
func ValidateTaskName(task string) error {
	switch task {
	case TaskAggregatedValidation, TaskTrain, TaskLocalValidation:
		return nil
	}
	return fmt.Errorf("unknown task %q (want %s, %s or %s)", task, TaskAggregatedValidation, TaskTrain, TaskLocalValidation)
}

// Task names one unit of work: which task, in which round.
type Task struct {
	Name  string
	Round int
	// Scaffold is set on a SCAFFOLD experiment's train task; nil
	// otherwise. A runner that cannot apply it must fail the task.
	Scaffold *Scaffold
}

// ControlVariatePrefix starts the names of SCAFFOLD's control variates in
// a SCAFFOLD experiment's models: the global model carries the server's
// variate of tensor NAME as ControlVariatePrefix+NAME. Runners never see
// them in a task's model (the collaborator takes them out), but a global
// model a researcher downloads has them.
const ControlVariatePrefix = "scaffold.c/"

// Scaffold is what a SCAFFOLD train task adds (see Task.Scaffold).
type Scaffold struct {
	// Correction is the control-variate correction c − c_i (the server's
	// variate minus the site's), one F32 tensor per float tensor of the
	// model, by its name and with its shape: the runner adds it to the
	// gradient of that tensor at every local step, and reports
	// Result.Steps and Result.StepSize. The runner must not modify it.
	Correction map[string]*tensor.Tensor
}

// Result is what a task produced.
type Result struct {
	// Model holds the new weights; set by Train only.
	Model tensor.Model
	// Samples is how many local samples the task used. FedAvg weighs each
	// update by it.
	Samples int64
	// Metrics are named scalars such as "loss" and "accuracy".
	Metrics map[string]float64
	// Steps and StepSize, reported by a train task with Scaffold, are
	// SCAFFOLD's K and η: the local steps taken and the step each took per
	// unit of gradient, so that (global − trained)/(K·η) is the mean
	// corrected gradient the site followed.
	Steps    int64
	StepSize float64
}

// Runner runs tasks on one site's data. A collaborator holds one Runner for
// the life of an experiment; calls are not concurrent. A runner must not
// modify the model it is given: the collaborator hands it the round's global
// model without copying it, and uses that model again for other tasks.
type Runner interface {
	// Train starts from model and returns trained weights with the same
	// tensor names, dtypes and shapes.
	Train(ctx context.Context, task Task, model tensor.Model) (Result, error)
	// Validate evaluates model and returns metrics only.
	Validate(ctx context.Context, task Task, model tensor.Model) (Result, error)
}

// Recycler is a Runner that can put the memory of a model it trained
// earlier to use again: the collaborator hands back a round's trained
// weights once it is done with them, and the runner reads the next trained
// weights into their buffers instead of new memory (fresh memory costs a
// page fault a page, which for a model of hundreds of MB is seconds).
type Recycler interface {
	// Recycle takes m, which the caller will not use again.
	Recycle(m tensor.Model)
}

// Rewriter is a Runner that may keep a copy of a model it returned, for a
// later task to read (the exec runner's persistent process keeps the
// trained weights' file for the local validation). A collaborator that
// changes such a model's values in place — differential privacy clips and
// noises the trained weights before anything sees them — says so, and the
// runner lets its copy go: a later task is handed the new values, never
// the ones it trained.
type Rewriter interface {
	// Rewritten says m's values changed since the runner returned it.
	Rewritten(m tensor.Model)
}
