// Package experiment holds what a researcher submits and what every party
// reads back: the experiment plan (plan.yaml), the experiment archive that
// carries it (a zip or tar.gz of a directory whose root holds plan.yaml), and
// the name rules for experiments, envoys and owners.
//
// Everything here treats its input as hostile: the director and the envoys
// receive archives and plans from researchers they do not control, so parsing
// is strict (unknown plan keys are errors, archive entries are checked before
// a byte is written) and errors are classified so a service can turn them
// into gRPC status codes:
//
//	ErrInvalidPlan     plan.yaml is malformed or breaks a rule      → InvalidArgument
//	ErrInvalidName     a name has characters fx refuses             → InvalidArgument
//	ErrInvalidArchive  the archive's content is malformed or unsafe → InvalidArgument
//	ErrTooLarge        the archive breaks a size or count limit     → ResourceExhausted
//
// Errors matching none of them come from the local system (a file that cannot
// be opened or written) and map to Internal or, for a missing file, NotFound.
package experiment
