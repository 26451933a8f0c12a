package privacy

import (
	"fmt"
	"testing"

	"github.com/fx-fl/fx/tensor"
)

// BenchmarkClipAndNoise is the collaborator's DP step on a float32 model of
// 25M parameters in 8 tensors, updated as bench/large/rewrite.py does (by
// 1e-3 everywhere, so the update is clipped): the size of issue 20's goal.
// Run it with -cpu 1 for the cost per site when many sites share the
// cores, and with -cpuprofile to see where it goes.
func BenchmarkClipAndNoise(b *testing.B) {
	const params = 25_000_000
	var global, trained tensor.Model
	for i := range 8 {
		g := tensor.New(fmt.Sprintf("layer%d.weight", i), tensor.F32, []int64{params / 8})
		tr := g.Clone()
		v := tr.Float32s()
		for j := range v {
			v[j] = 1e-3
		}
		global, trained = append(global, g), append(trained, tr)
	}
	b.SetBytes(4 * params)
	b.ResetTimer()
	for range b.N {
		if _, err := ClipAndNoise(global, trained, 1, 5); err != nil {
			b.Fatal(err)
		}
	}
}
