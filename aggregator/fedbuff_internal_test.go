package aggregator

import (
	"testing"

	"github.com/fx-fl/fx/tensor"
)

// TestStepsInEveryFloatDType: the asynchronous step x + η·mean and
// SCAFFOLD's x + η·(y − x) give the same values in every float dtype
// (small integers and halves, exact in all four): F32 and F64 on their
// typed views, F16 and BF16 through float32.
func TestStepsInEveryFloatDType(t *testing.T) {
	tensorOf := func(d tensor.DType, v ...float32) tensor.Model {
		x := tensor.New("w", d, []int64{int64(len(v))})
		if err := x.SetFloat32(v); err != nil {
			t.Fatal(err)
		}
		return tensor.Model{x}
	}
	for _, d := range []tensor.DType{tensor.F32, tensor.F64, tensor.F16, tensor.BF16} {
		next, err := asyncStep(tensorOf(d, 1, 2), tensorOf(d, 0.5, -1), 2)
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := next[0].Float32Copy(); got[0] != 2 || got[1] != 0 {
			t.Errorf("%s: asynchronous step %v, want [2 0]", d, got)
		}
		next, err = scaffoldStep(tensorOf(d, 1, 2), tensorOf(d, 3, 0), 0.5, 1)
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := next[0].Float32Copy(); got[0] != 2 || got[1] != 1 {
			t.Errorf("%s: SCAFFOLD step %v, want [2 1]", d, got)
		}
	}
}
