//go:build !unix

package privacy

import "os"

// Without flock, charges are serialised within the process only: one
// envoy per work directory, as the envoy requires anyway.
func lockFile(*os.File) error { return nil }

func unlockFile(*os.File) error { return nil }
