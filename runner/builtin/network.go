package builtin

import (
	"math"

	"gonum.org/v1/gonum/blas/blas32"
)

// network is a stack of fully connected layers, ReLU between them and a
// softmax cross-entropy loss on top; the softmax model is the stack of one.
// Weights are row-major [out, in] as PyTorch's nn.Linear stores them, so
// tensors are copied in and out as they are. (Holding them transposed, so
// that gonum's kernels skip the zero pixels and ReLU outputs of the left
// operand in both large products, measured no faster.)
//
// All buffers are allocated once for up to maxBatch rows, so training
// allocates nothing per sample or per minibatch.
type network struct {
	sizes []int       // inputs, hidden widths..., classes
	w, b  [][]float32 // per layer: weights out×in, bias out
	// vw, vb hold the SGD momentum buffers; backward adds the gradient into
	// them, so with beta 0 they hold the plain gradient.
	vw, vb [][]float32
	// gw, gb hold the global model a FedProx train task started from, the
	// centre of its proximal term; nil when the plan sets no proximal_mu.
	gw, gb [][]float32
	// cw, cb are a SCAFFOLD train task's correction c − c_i, added to the
	// gradient at every step; nil otherwise (scaffold.go).
	cw, cb [][]float32
	// act[l] is the input of layer l for the current batch, act[layers]
	// the class probabilities; act[0] is the buffer gather fills, input the
	// samples the last forward pass read (act[0] or rows of a split).
	act   [][]float32
	input []float32
	// delta[l] is the gradient of the mean loss with respect to the
	// pre-activation output of layer l.
	delta    [][]float32
	maxBatch int
	gemm     gemmFunc
}

func newNetwork(sizes []int, maxBatch int, gemm gemmFunc) *network {
	layers := len(sizes) - 1
	n := &network{
		sizes:    sizes,
		w:        make([][]float32, layers),
		b:        make([][]float32, layers),
		vw:       make([][]float32, layers),
		vb:       make([][]float32, layers),
		act:      make([][]float32, layers+1),
		delta:    make([][]float32, layers),
		maxBatch: maxBatch,
		gemm:     gemm,
	}
	for l := range layers {
		in, out := sizes[l], sizes[l+1]
		n.w[l] = make([]float32, out*in)
		n.b[l] = make([]float32, out)
		n.vw[l] = make([]float32, out*in)
		n.vb[l] = make([]float32, out)
		n.delta[l] = make([]float32, maxBatch*out)
	}
	for l := range sizes {
		n.act[l] = make([]float32, maxBatch*sizes[l])
	}
	return n
}

func (n *network) layers() int { return len(n.sizes) - 1 }

// gather copies the rows idx of x (features wide) into act[0].
func (n *network) gather(x []float32, idx []int) []float32 {
	f := n.sizes[0]
	in := n.act[0][:len(idx)*f]
	for r, i := range idx {
		copy(in[r*f:(r+1)*f], x[i*f:(i+1)*f])
	}
	return in
}

// forward runs rows samples of x (rows×inputs) through the network and leaves
// the logits in act[layers] (x may be act[0] or any other buffer: it is
// read, never written).
func (n *network) forward(x []float32, rows int) {
	in := x
	last := n.layers() - 1
	for l := range n.layers() {
		fi, fo := n.sizes[l], n.sizes[l+1]
		out := n.act[l+1][:rows*fo]
		for r := range rows {
			copy(out[r*fo:(r+1)*fo], n.b[l])
		}
		// out = in · Wᵀ + bias
		n.gemm(false, true, rows, fo, fi, 1, in, fi, n.w[l], fi, 1, out, fo)
		if l < last {
			for i, v := range out {
				out[i] = max(v, 0)
			}
		}
		in = out
	}
	n.input = x[:rows*n.sizes[0]]
}

// score returns the summed cross-entropy and the number of correct
// predictions of the logits in act[layers] against labels y, replacing the
// logits by class probabilities. With grad it also sets delta[last] to the
// gradient of the mean loss. The loss is computed from the logits
// (log-sum-exp), so it is exact even where a probability underflows; it is
// NaN or Inf only when the logits are, which is how divergence shows.
func (n *network) score(y []int32, grad bool) (lossSum float64, correct int) {
	classes := n.sizes[len(n.sizes)-1]
	rows := len(y)
	z := n.act[n.layers()][:rows*classes]
	scale := 1 / float32(rows)
	for r, label := range y {
		row := z[r*classes : (r+1)*classes]
		best := 0
		for j, v := range row {
			if v > row[best] {
				best = j
			}
		}
		if best == int(label) {
			correct++
		}
		m, zl := row[best], row[label]
		var sum float64
		for j, v := range row {
			e := math.Exp(float64(v - m))
			row[j] = float32(e)
			sum += e
		}
		lossSum += math.Log(sum) - float64(zl-m)
		inv := float32(1 / sum)
		for j := range row {
			row[j] *= inv
		}
		if grad {
			d := n.delta[n.layers()-1][r*classes : (r+1)*classes]
			for j, p := range row {
				d[j] = p * scale
			}
			d[label] -= scale
		}
	}
	return lossSum, correct
}

// backward adds the gradient of the mean loss of the last forward pass to
// the momentum buffers: v = beta·v + ∇. score(…, true) must have run.
func (n *network) backward(rows int, beta float32) {
	for l := n.layers() - 1; l >= 0; l-- {
		fi, fo := n.sizes[l], n.sizes[l+1]
		d := n.delta[l][:rows*fo]
		in := n.input
		if l > 0 {
			in = n.act[l][:rows*fi]
		}
		// ∇Wᵀ = inᵀ · d  (in×out)
		n.gemm(true, false, fo, fi, rows, 1, d, fo, in, fi, beta, n.vw[l], fi)
		vb := n.vb[l]
		for j := range vb {
			vb[j] *= beta
		}
		for r := range rows {
			for j, v := range d[r*fo : (r+1)*fo] {
				vb[j] += v
			}
		}
		if l == 0 {
			break
		}
		// Gradient with respect to this layer's input, through the ReLU of
		// the layer below: dIn = (d · W) ⊙ [in > 0].
		dIn := n.delta[l-1][:rows*fi]
		n.gemm(false, false, rows, fi, fo, 1, d, fo, n.w[l], fi, 0, dIn, fi)
		for i, a := range in {
			if a <= 0 {
				dIn[i] = 0
			}
		}
	}
}

// step applies one SGD update from the momentum buffers, adding the weight
// decay term to them first as PyTorch's SGD does, and FedProx's proximal
// term μ(w − w_global), the gradient of (μ/2)·‖w − w_global‖², to every
// weight and bias, as the FedProx paper and its PyTorch code add it to the
// loss before the optimiser sees the gradient.
func (n *network) step(lr, weightDecay, mu float32) {
	for l := range n.layers() {
		if weightDecay != 0 {
			axpy(weightDecay, n.w[l], n.vw[l])
		}
		if mu != 0 {
			addProximal(mu, n.w[l], n.gw[l], n.vw[l])
			addProximal(mu, n.b[l], n.gb[l], n.vb[l])
		}
		if n.cw != nil {
			axpy(1, n.cw[l], n.vw[l])
			axpy(1, n.cb[l], n.vb[l])
		}
		axpy(-lr, n.vw[l], n.w[l])
		axpy(-lr, n.vb[l], n.b[l])
	}
}

// addProximal computes v += mu·(w − g), subtracting first so that the
// term is exactly zero where the weights still equal the global model.
func addProximal(mu float32, w, g, v []float32) {
	g, v = g[:len(w)], v[:len(w)]
	for i, x := range w {
		v[i] += mu * (x - g[i])
	}
}

// keepGlobal allocates the proximal term's copy of the global model, once.
func (n *network) keepGlobal() {
	n.gw = make([][]float32, n.layers())
	n.gb = make([][]float32, n.layers())
	for l := range n.layers() {
		n.gw[l] = make([]float32, len(n.w[l]))
		n.gb[l] = make([]float32, len(n.b[l]))
	}
}

// saveGlobal copies the loaded weights as the proximal term's centre.
func (n *network) saveGlobal() {
	for l := range n.layers() {
		copy(n.gw[l], n.w[l])
		copy(n.gb[l], n.b[l])
	}
}

// axpy computes y += alpha·x with gonum's vector kernel.
func axpy(alpha float32, x, y []float32) {
	blas32.Axpy(alpha, blas32.Vector{N: len(x), Inc: 1, Data: x}, blas32.Vector{N: len(y), Inc: 1, Data: y})
}

// clearMomentum starts a fresh optimiser: each train task starts from the
// aggregated model, for which old momentum would point the wrong way.
func (n *network) clearMomentum() {
	for l := range n.layers() {
		clear(n.vw[l])
		clear(n.vb[l])
	}
}
