package builtin

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// TestGemm compares parallelGemm, whose blocking is the intricate part,
// with the naive triple loop in every transpose case and across the shapes
// that take its different blocking paths.
func TestGemm(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	shapes := [][3]int{{1, 1, 1}, {3, 5, 7}, {64, 128, 784}, {130, 70, 33}, {20, 300, 50}, {5, 200, 300}, {200, 10, 64}}
	for _, s := range shapes {
		for _, tA := range []bool{false, true} {
			for _, tB := range []bool{false, true} {
				t.Run(fmt.Sprintf("%v/tA=%v,tB=%v", s, tA, tB), func(t *testing.T) {
					m, n, k := s[0], s[1], s[2]
					a := randSlice(rng, m*k)
					b := randSlice(rng, k*n)
					lda, ldb := k, n
					if tA {
						lda = m
					}
					if tB {
						ldb = k
					}
					for _, beta := range []float32{0, 0.5} {
						c0 := randSlice(rng, m*n)
						want := append([]float32(nil), c0...)
						got := append([]float32(nil), c0...)
						naiveGemm(tA, tB, m, n, k, 1.5, a, lda, b, ldb, beta, want, n)
						parallelGemm(tA, tB, m, n, k, 1.5, a, lda, b, ldb, beta, got, n)
						for i := range want {
							if d := math.Abs(float64(want[i] - got[i])); d > 1e-4*(1+math.Abs(float64(want[i]))) {
								t.Fatalf("beta %v: C[%d] = %v, want %v", beta, i, got[i], want[i])
							}
						}
					}
				})
			}
		}
	}
}

func randSlice(rng *rand.Rand, n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = float32(rng.NormFloat64())
	}
	return s
}

// meanLoss runs the network forward on x and returns the mean cross-entropy.
func meanLoss(n *network, x []float32, y []int32) float64 {
	n.forward(x, len(y))
	loss, _ := n.score(y, false)
	return loss / float64(len(y))
}

// TestGradientCheck compares backward's gradients with central finite
// differences of the loss, for the softmax model and MLPs of one and two
// hidden layers, with both matrix kernels.
func TestGradientCheck(t *testing.T) {
	tests := []struct {
		name  string
		sizes []int
		gemm  gemmFunc
	}{
		{"softmax", []int{5, 3}, parallelGemm},
		{"mlp one hidden", []int{6, 8, 4}, parallelGemm},
		{"mlp two hidden", []int{7, 9, 5, 3}, parallelGemm},
		{"mlp two hidden naive", []int{7, 9, 5, 3}, naiveGemm},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const rows = 6
			rng := rand.New(rand.NewPCG(3, 4))
			n := newNetwork(tc.sizes, rows, tc.gemm)
			for l := range n.layers() {
				for i := range n.w[l] {
					n.w[l][i] = float32(rng.NormFloat64()) * 0.8
				}
				for i := range n.b[l] {
					n.b[l][i] = float32(rng.NormFloat64()) * 0.3
				}
			}
			x := randSlice(rng, rows*tc.sizes[0])
			y := make([]int32, rows)
			for i := range y {
				y[i] = int32(rng.IntN(tc.sizes[len(tc.sizes)-1]))
			}
			n.forward(x, rows)
			n.score(y, true)
			n.backward(rows, 0) // beta 0: the buffers hold the plain gradient

			const eps = 1e-2
			checked, kinks := 0, 0
			for l := range n.layers() {
				for _, p := range []struct {
					name      string
					val, grad []float32
				}{{"weight", n.w[l], n.vw[l]}, {"bias", n.b[l], n.vb[l]}} {
					for i := range p.val {
						orig := p.val[i]
						p.val[i] = orig + eps
						up := meanLoss(n, x, y)
						p.val[i] = orig + eps/2
						upHalf := meanLoss(n, x, y)
						p.val[i] = orig - eps
						down := meanLoss(n, x, y)
						p.val[i] = orig - eps/2
						downHalf := meanLoss(n, x, y)
						p.val[i] = orig
						num := (up - down) / (2 * eps)
						numHalf := (upHalf - downHalf) / eps
						// A ReLU switching inside the interval makes the
						// difference quotient depend on the step: skip those.
						if math.Abs(num-numHalf) > 1e-3+0.05*math.Abs(num) {
							kinks++
							continue
						}
						got := float64(p.grad[i])
						if math.Abs(got-num) > 2e-3+2e-2*math.Abs(num) {
							t.Errorf("layer %d %s[%d]: backward %.6f, finite difference %.6f", l, p.name, i, got, num)
						}
						checked++
					}
				}
			}
			if kinks*10 > checked {
				t.Errorf("%d parameters near a ReLU kink, %d checked: the check is not checking", kinks, checked)
			}
		})
	}
}
