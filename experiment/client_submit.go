package experiment

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// Upload is an experiment archive ready to submit: packed (from a
// directory) or inspected (an archive given as is), with the size and digest
// the director checks and the plan it validates before any byte moves.
// PrepareUpload makes one; Close removes the archive it packed.
type Upload struct {
	// Path is the archive on disk.
	Path string
	// Size and SHA256 (lower-case hex) are the archive's.
	Size   int64
	SHA256 string
	// Plan is plan.yaml as it is in the archive, byte for byte.
	Plan []byte
	// Name is the plan's name, which the experiment takes unless
	// SubmitOptions.Name says otherwise.
	Name string

	temp bool
}

// PrepareUpload packs a directory (which must hold plan.yaml) into a
// temporary tar.gz, or takes a .tar.gz or .zip archive as it is, and checks
// the plan locally so a mistake is reported before connecting. The archive
// is written to disk, never held in memory, so its size is bounded by the
// disk only. Close the Upload to remove a packed archive.
func PrepareUpload(dirOrArchive string) (u *Upload, err error) {
	fi, err := os.Stat(dirOrArchive)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s does not exist: give an experiment directory (holding plan.yaml) or an archive of one", dirOrArchive)
		}
		return nil, fmt.Errorf("preparing the experiment: %w", err)
	}
	if fi.IsDir() {
		return packUpload(dirOrArchive)
	}
	m, err := Inspect(dirOrArchive, Limits{})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", dirOrArchive, err)
	}
	u = &Upload{Path: dirOrArchive, Plan: m.Plan}
	if err := u.hashFile(); err != nil {
		return nil, err
	}
	hasModel := slices.ContainsFunc(m.Files, func(f FileInfo) bool { return f.Path == InitialModelFile })
	if err := u.checkPlan(dirOrArchive+": "+PlanFile, hasModel); err != nil {
		return nil, err
	}
	return u, nil
}

func packUpload(dir string) (u *Upload, err error) {
	planPath := filepath.Join(dir, PlanFile)
	plan, err := os.ReadFile(planPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%s has no plan.yaml: an experiment directory needs one at its root (see docs/experiments.md)", dir)
	case err != nil:
		return nil, fmt.Errorf("reading the plan: %w", err)
	}
	u = &Upload{Plan: plan, temp: true}
	fi, err := os.Stat(filepath.Join(dir, InitialModelFile))
	if err := u.checkPlan(planPath, err == nil && fi.Mode().IsRegular()); err != nil {
		return nil, err
	}
	f, err := os.CreateTemp("", "fx-experiment-*.tar.gz")
	if err != nil {
		return nil, fmt.Errorf("packing %s: %w", dir, err)
	}
	u.Path = f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	h := sha256.New()
	cw := &countWriter{w: io.MultiWriter(f, h)}
	if err := Pack(dir, cw); err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("packing %s: %w", dir, err)
	}
	u.Size, u.SHA256 = cw.n, hex.EncodeToString(h.Sum(nil))
	return u, nil
}

// checkPlan parses the plan as the director will, so an invalid plan, or
// one missing the initial model it needs, is reported before connecting;
// all but an aggregation.algorithm this binary does not know, which the
// director's fx may have registered.
func (u *Upload) checkPlan(where string, hasModel bool) error {
	p, err := ParsePlanAnyAlgorithm(u.Plan) // the director checks the algorithm
	if err != nil {
		return fmt.Errorf("%s: %w", where, err)
	}
	if need := p.InitialModelNeed(); need != "" && !hasModel {
		return fmt.Errorf("%s: the experiment has no %s beside its plan: %s", where, InitialModelFile, need)
	}
	u.Name = p.Name
	return nil
}

func (u *Upload) hashFile() error {
	size, sha, err := HashFile(u.Path)
	if err != nil {
		return fmt.Errorf("reading the archive: %w", err)
	}
	u.Size, u.SHA256 = size, sha
	return nil
}

// Close removes the archive PrepareUpload packed; an archive the caller
// gave is left alone.
func (u *Upload) Close() error {
	if !u.temp {
		return nil
	}
	if err := os.Remove(u.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

// SubmitOptions tune Submit.
type SubmitOptions struct {
	// Name names the experiment; empty means the plan's name.
	Name string
	// Progress, when set, is called after each chunk with the bytes sent so
	// far and the archive's size: for a progress bar.
	Progress func(sent, total int64)
}

// Submit packs dirOrArchive (see PrepareUpload), uploads it and returns the
// experiment the director recorded (PENDING, or further along under the
// auto review policy).
func (c *Client) Submit(ctx context.Context, dirOrArchive string, opts SubmitOptions) (*fxv1.Experiment, error) {
	u, err := PrepareUpload(dirOrArchive)
	if err != nil {
		return nil, err
	}
	defer u.Close()
	return c.SubmitUpload(ctx, u, opts)
}

// SubmitUpload streams a prepared archive: the header (name, size, digest,
// plan), then chunks of at most ChunkSize read from disk one at a time.
// The director's refusal (invalid plan, a name already taken, an archive
// over its limits) comes back as a *StatusError with its reason.
func (c *Client) SubmitUpload(ctx context.Context, u *Upload, opts SubmitOptions) (*fxv1.Experiment, error) {
	name := opts.Name
	if name == "" {
		name = u.Name
	}
	if err := ValidateName("experiment", name); err != nil {
		return nil, err
	}
	op := fmt.Sprintf("submitting experiment %s", name)
	f, err := os.Open(u.Path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	defer f.Close()

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Fail fast: a director that is away is reported at once rather than
	// waited for without bound (the context may have no deadline).
	stream, err := c.rpc.SubmitExperiment(sctx)
	if err != nil {
		return nil, c.wrap(op, err)
	}
	err = stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{
		Name: opts.Name, Size: u.Size, Sha256: u.SHA256, PlanYaml: string(u.Plan),
	}}})
	var sent int64
	for err == nil {
		// A fresh buffer per chunk: gRPC forbids changing a message after
		// Send (stats handlers may read it later). Only one chunk is live
		// at a time, so memory stays at about ChunkSize.
		buf := make([]byte, ChunkSize)
		var n int
		n, err = io.ReadFull(f, buf)
		if n > 0 {
			if serr := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: buf[:n]}}); serr != nil {
				err = serr
				break
			}
			sent += int64(n)
			if opts.Progress != nil {
				opts.Progress(sent, u.Size)
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			err = nil
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: reading %s: %w", op, u.Path, err)
		}
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, c.wrap(op, err)
	}
	// A Send that fails with io.EOF means the director already answered
	// (a refusal); CloseAndRecv returns that answer.
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return nil, c.wrap(op, err)
	}
	return resp.GetExperiment(), nil
}
