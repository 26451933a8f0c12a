package aggregator

// HoldSaves keeps a's write-behind saves (see writebehind.go) from starting
// until gate is closed; a save still held when Run is cancelled does not
// happen, as when the process dies before writing the round's files.
func HoldSaves(a *Aggregator, gate <-chan struct{}) {
	a.mu.Lock()
	a.holdSaves = gate
	a.mu.Unlock()
}
