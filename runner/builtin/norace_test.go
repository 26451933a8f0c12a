//go:build !race

package builtin

// raceEnabled reports that the race detector is on: the Fashion-MNIST
// tests and benchmarks, which train for seconds without it, skip themselves.
const raceEnabled = false
