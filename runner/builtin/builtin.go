// Package builtin implements runner.Runner with models written in plain Go —
// multinomial logistic regression ("softmax") and a multilayer perceptron
// ("mlp") trained by minibatch SGD with momentum — so a federation can run an
// experiment without any code or interpreter from the researcher. With a
// proximal μ (Config.ProximalMu) training is FedProx's: the gradient of
// (μ/2)·‖w − w_global‖² joins the loss's at every step.
//
// Tensors are named "fc0.weight", "fc0.bias", "fc1.weight", ... and stored as
// F32 with PyTorch's nn.Linear shapes ([out, in] and [out]), so a model
// trained here loads into the equivalent PyTorch module and the other way
// round.
package builtin

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"sync"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// Streams of the random generators, so that initialisation and shuffling
// never share a sequence for the same seed.
const (
	streamInit uint64 = iota + 1
	streamShuffle
)

// evalBatch is the number of rows evaluated at once: large enough for the
// matrix kernels to run at full speed, small enough to stay in cache.
const evalBatch = 256

// Config describes a built-in runner.
type Config struct {
	// Model is "softmax" or "mlp".
	Model string
	// Hyperparameters are the plan's settings (see ParseHyperparameters).
	Hyperparameters map[string]any
	// Data is the site's data set; the runner reads it and never changes it.
	Data *dataset.Dataset
	// ProximalMu is FedProx's μ, the plan's training.proximal_mu: train
	// minimises the loss plus (μ/2)·‖w − w_global‖², w_global being the
	// model the task starts from. 0 is plain SGD. It costs a second copy
	// of the weights, held only when μ > 0.
	ProximalMu float64
}

// Runner trains and validates one built-in model on one site's data. Its
// buffers are allocated once in New; calls are serialised.
type Runner struct {
	mu     sync.Mutex
	model  string
	hp     Hyperparameters
	prox   float64 // FedProx's proximal μ
	data   *dataset.Dataset
	layout tensor.Model
	net    *network
	params map[string][]float32 // tensor name → the network's buffer
	perm   []int
	labels []int32
}

var _ runner.Runner = (*Runner)(nil)

// New checks the configuration and the data and allocates the network.
func New(c Config) (*Runner, error) {
	hp, err := ParseHyperparameters(c.Model, c.Hyperparameters)
	if err != nil {
		return nil, err
	}
	if !(c.ProximalMu >= 0) || math.IsInf(c.ProximalMu, 0) {
		return nil, fmt.Errorf("builtin %s: proximal μ %v: want a finite number ≥ 0 (training.proximal_mu)", c.Model, c.ProximalMu)
	}
	if c.Data == nil {
		return nil, fmt.Errorf("builtin %s: no data set", c.Model)
	}
	if err := c.Data.Validate(); err != nil {
		return nil, fmt.Errorf("builtin %s: %w", c.Model, err)
	}
	sizes, err := layerSizes(c.Model, hp, c.Data.SampleShape, c.Data.Classes)
	if err != nil {
		return nil, err
	}
	batch := min(hp.BatchSize, c.Data.Train.N)
	r := &Runner{
		model:  c.Model,
		hp:     hp,
		prox:   c.ProximalMu,
		data:   c.Data,
		layout: layout(sizes),
		net:    newNetwork(sizes, max(batch, evalBatch), parallelGemm),
		params: make(map[string][]float32, 2*(len(sizes)-1)),
		perm:   make([]int, c.Data.Train.N),
		labels: make([]int32, batch),
	}
	for l := range len(sizes) - 1 {
		r.params[weightName(l)] = r.net.w[l]
		r.params[biasName(l)] = r.net.b[l]
	}
	if r.prox > 0 {
		r.net.keepGlobal()
	}
	return r, nil
}

// Hyperparameters returns the parsed settings, defaults filled in.
func (r *Runner) Hyperparameters() Hyperparameters { return r.hp }

// Train runs hp.Epochs passes of minibatch SGD over the training split,
// starting from model with fresh momentum. Samples are visited in an order
// drawn from seed+round, so rounds differ but a rerun repeats exactly. The
// metrics are the mean loss and accuracy over the last epoch's minibatches,
// measured as they were trained on (as PyTorch training loops report them);
// with a proximal μ the loss is the data's alone, without the proximal term,
// so that it compares with plain training's.
func (r *Runner) Train(ctx context.Context, task runner.Task, model tensor.Model) (runner.Result, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.load(model); err != nil {
		return runner.Result{}, err
	}
	if err := r.setCorrection(task.Scaffold); err != nil {
		return runner.Result{}, err
	}
	defer r.setCorrection(nil)
	net, hp, train := r.net, r.hp, &r.data.Train
	net.clearMomentum()
	if r.prox > 0 {
		net.saveGlobal()
	}
	rng := rand.New(rand.NewPCG(uint64(hp.Seed+int64(task.Round)), streamShuffle))
	for i := range r.perm {
		r.perm[i] = i
	}
	lr, momentum, wd, prox := float32(hp.RoundLR(task.Round)), float32(hp.Momentum), float32(hp.WeightDecay), float32(r.prox)
	var lossSum float64
	var correct int
	var steps int64
	for epoch := range hp.Epochs {
		rng.Shuffle(len(r.perm), func(i, j int) { r.perm[i], r.perm[j] = r.perm[j], r.perm[i] })
		lossSum, correct = 0, 0
		for start := 0; start < train.N; start += hp.BatchSize {
			if err := ctx.Err(); err != nil {
				return runner.Result{}, fmt.Errorf("builtin %s: train round %d stopped in epoch %d: %w", r.model, task.Round, epoch+1, err)
			}
			idx := r.perm[start:min(start+hp.BatchSize, train.N)]
			y := r.labels[:len(idx)]
			for k, i := range idx {
				y[k] = train.Y[i]
			}
			net.forward(net.gather(train.X, idx), len(idx))
			l, c := net.score(y, true)
			lossSum += l
			correct += c
			net.backward(len(idx), momentum)
			net.step(lr, wd, prox)
			steps++
		}
		if math.IsNaN(lossSum) || math.IsInf(lossSum, 0) {
			return runner.Result{}, fmt.Errorf("builtin %s: training diverged in round %d, epoch %d (loss %v): lower lr (now %g)",
				r.model, task.Round, epoch+1, lossSum, hp.RoundLR(task.Round))
		}
	}
	out := make(tensor.Model, len(model))
	for i, t := range model {
		out[i] = tensor.FromFloat32(t.Name, t.Shape, r.params[t.Name])
		if err := out[i].CheckFinite(); err != nil {
			return runner.Result{}, fmt.Errorf("builtin %s: training diverged in round %d: %w", r.model, task.Round, err)
		}
	}
	n := float64(train.N)
	res := runner.Result{
		Model:   out,
		Samples: int64(train.N),
		Metrics: map[string]float64{"loss": lossSum / n, "accuracy": float64(correct) / n},
	}
	r.scaffoldResult(task, &res, steps)
	return res, nil
}

// Validate evaluates model on the validation split.
func (r *Runner) Validate(ctx context.Context, task runner.Task, model tensor.Model) (runner.Result, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	valid := &r.data.Valid
	if valid.N == 0 {
		return runner.Result{}, fmt.Errorf("builtin %s: %s round %d: %w", r.model, task.Name, task.Round, ErrNoValidation)
	}
	if err := r.load(model); err != nil {
		return runner.Result{}, err
	}
	loss, acc, err := r.evaluate(ctx, valid)
	if err != nil {
		return runner.Result{}, fmt.Errorf("builtin %s: %s round %d: %w", r.model, task.Name, task.Round, err)
	}
	return runner.Result{
		Samples: int64(valid.N),
		Metrics: map[string]float64{"loss": loss, "accuracy": acc},
	}, nil
}

// evaluate returns the mean loss and the accuracy of the loaded weights on s.
func (r *Runner) evaluate(ctx context.Context, s *dataset.Split) (loss, accuracy float64, err error) {
	net := r.net
	f := net.sizes[0]
	var lossSum float64
	var correct int
	for start := 0; start < s.N; start += net.maxBatch {
		if err := ctx.Err(); err != nil {
			return 0, 0, err
		}
		end := min(start+net.maxBatch, s.N)
		net.forward(s.X[start*f:end*f], end-start)
		l, c := net.score(s.Y[start:end], false)
		lossSum += l
		correct += c
	}
	return lossSum / float64(s.N), float64(correct) / float64(s.N), nil
}

// load checks model against the expected layout and copies its weights into
// the network.
func (r *Runner) load(model tensor.Model) error {
	if err := model.Validate(); err != nil {
		return fmt.Errorf("builtin %s: input model: %w", r.model, err)
	}
	if err := r.layout.Matches(model); err != nil {
		return fmt.Errorf("builtin %s: input model does not fit %s: %w", r.model, describe(r.layout), err)
	}
	for _, t := range model {
		if err := t.CheckFinite(); err != nil {
			return fmt.Errorf("builtin %s: input model: %w", r.model, err)
		}
		copy(r.params[t.Name], t.Float32s())
	}
	return nil
}

// InitialModel returns the starting weights of a built-in model for samples
// of sampleShape and the given number of classes: He-normal weights for the
// ReLU layers, Glorot-uniform for the output layer, zero biases, all drawn
// from the "seed" hyper-parameter. The aggregator calls it once so that every
// collaborator starts from the same model.
func InitialModel(model string, hyper map[string]any, sampleShape []int64, classes int) (tensor.Model, error) {
	hp, err := ParseHyperparameters(model, hyper)
	if err != nil {
		return nil, err
	}
	sizes, err := layerSizes(model, hp, sampleShape, classes)
	if err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(uint64(hp.Seed), streamInit))
	m := layout(sizes)
	for l := range len(sizes) - 1 {
		in, out := sizes[l], sizes[l+1]
		w := tensor.New(weightName(l), tensor.F32, []int64{int64(out), int64(in)})
		ws := w.Float32s()
		if l < len(sizes)-2 {
			std := math.Sqrt(2 / float64(in))
			for i := range ws {
				ws[i] = float32(std * rng.NormFloat64())
			}
		} else {
			limit := math.Sqrt(6 / float64(in+out))
			for i := range ws {
				ws[i] = float32(limit * (2*rng.Float64() - 1))
			}
		}
		m[2*l] = w
		m[2*l+1] = tensor.New(biasName(l), tensor.F32, []int64{int64(out)})
	}
	return m, nil
}

func weightName(layer int) string { return fmt.Sprintf("fc%d.weight", layer) }
func biasName(layer int) string   { return fmt.Sprintf("fc%d.bias", layer) }

// layerSizes returns the widths from the input through the hidden layers to
// the classes.
func layerSizes(model string, hp Hyperparameters, sampleShape []int64, classes int) ([]int, error) {
	if len(sampleShape) == 0 {
		return nil, fmt.Errorf("builtin %s: empty sample shape", model)
	}
	features := int64(1)
	for _, d := range sampleShape {
		if d <= 0 {
			return nil, fmt.Errorf("builtin %s: sample shape %v has a non-positive dimension", model, sampleShape)
		}
		features *= d
		if features > maxParams {
			return nil, fmt.Errorf("builtin %s: sample shape %v has more than %d features", model, sampleShape, maxParams)
		}
	}
	if classes < 2 {
		return nil, fmt.Errorf("builtin %s: %d classes, need at least 2", model, classes)
	}
	sizes := append(append([]int{int(features)}, hp.Hidden...), classes)
	params := 0
	for l := range len(sizes) - 1 {
		params += (sizes[l] + 1) * sizes[l+1]
		if params > maxParams {
			return nil, fmt.Errorf("builtin %s: layers %v need more than %d parameters", model, sizes, maxParams)
		}
	}
	return sizes, nil
}

// layout lists the tensors of a network of the given widths, without data:
// the reference input models are matched against.
func layout(sizes []int) tensor.Model {
	m := make(tensor.Model, 0, 2*(len(sizes)-1))
	for l := range len(sizes) - 1 {
		in, out := int64(sizes[l]), int64(sizes[l+1])
		m = append(m,
			&tensor.Tensor{Name: weightName(l), DType: tensor.F32, Shape: []int64{out, in}},
			&tensor.Tensor{Name: biasName(l), DType: tensor.F32, Shape: []int64{out}})
	}
	return m
}

// describe renders a layout for error messages.
func describe(m tensor.Model) string {
	parts := make([]string, len(m))
	for i, t := range m {
		parts[i] = fmt.Sprintf("%s %s%v", t.Name, t.DType, t.Shape)
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

// ErrNoValidation is returned by Validate when the site's data set has no
// validation split, so a collaborator can tell it from a failure.
var ErrNoValidation = errors.New("the data set has no validation samples")
