package director

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/disk"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// submitStream is the part of the SubmitExperiment stream intake reads.
type submitStream interface {
	Recv() (*fxv1.SubmitExperimentRequest, error)
}

// submit takes an experiment upload from owner: header first, then the
// archive streamed straight to a temporary file while it is hashed, so the
// archive is never held in memory and a too-large upload is refused as soon
// as its bytes pass the declared size. Only when size, digest, archive and
// plan all check out is the file moved into place and the record written;
// any failure removes the file and leaves no record.
func (d *Director) submit(owner string, stream submitStream) (*fxv1.Experiment, error) {
	started := time.Now()
	done, err := d.startUpload(owner)
	if err != nil {
		return nil, err
	}
	defer done()
	first, err := stream.Recv()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("empty upload: send a header first: %w", ErrInvalidArgument)
		}
		return nil, err
	}
	h := first.GetHeader()
	if h == nil {
		return nil, fmt.Errorf("the first message of an upload must be the header (name, size, sha256, plan): %w", ErrInvalidArgument)
	}
	plan, err := experiment.ParsePlan([]byte(h.GetPlanYaml()))
	if err != nil {
		return nil, err
	}
	name := h.GetName()
	if name == "" {
		name = plan.Name
	}
	if err := experiment.ValidateName("experiment", name); err != nil {
		return nil, err
	}
	switch {
	case h.GetSize() <= 0:
		return nil, fmt.Errorf("header size %d: an archive has at least one byte: %w", h.GetSize(), ErrInvalidArgument)
	case h.GetSize() > d.cfg.MaxArchiveBytes:
		return nil, fmt.Errorf("the archive is %d bytes; this director accepts at most %d: %w", h.GetSize(), d.cfg.MaxArchiveBytes, ErrTooLarge)
	}
	want := strings.ToLower(h.GetSha256())
	if b, err := hex.DecodeString(want); err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("header sha256 %q is not 64 hex digits: %w", h.GetSha256(), ErrInvalidArgument)
	}

	key := owner + "/" + name
	d.mu.Lock()
	if err := d.nameFreeLocked(owner, name); err != nil {
		d.mu.Unlock()
		return nil, err
	}
	d.reserved[key] = true
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		delete(d.reserved, key)
		d.mu.Unlock()
	}()

	tmp, err := os.CreateTemp(filepath.Join(d.cfg.DataDir, "tmp"), "upload-*")
	if err != nil {
		return nil, storeError(err)
	}
	tmpPath := tmp.Name()
	committed := false
	defer func() {
		if !committed {
			_ = tmp.Close()
			_ = os.Remove(tmpPath)
		}
	}()
	began := time.Now()
	hash := sha256.New()
	// Writing and hashing run beside the receiving, so the network, TLS
	// and the disk work at once; at most uploadQueue chunks wait between
	// them, which bounds the memory an upload takes whatever its size.
	w := newAsyncWriter(io.MultiWriter(tmp, hash), uploadQueue)
	defer w.Close()
	var got int64
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		chunk := msg.GetChunk()
		if msg.GetHeader() != nil {
			return nil, fmt.Errorf("a second header after %d bytes: send one header, then chunks: %w", got, ErrInvalidArgument)
		}
		if got+int64(len(chunk)) > h.GetSize() {
			if got+int64(len(chunk)) > d.cfg.MaxArchiveBytes {
				return nil, fmt.Errorf("the upload passed this director's limit of %d bytes: %w", d.cfg.MaxArchiveBytes, ErrTooLarge)
			}
			return nil, fmt.Errorf("the upload is longer than the %d bytes the header declared: %w", h.GetSize(), ErrInvalidArgument)
		}
		if _, err := w.Write(chunk); err != nil {
			return nil, storeError(err)
		}
		got += int64(len(chunk))
	}
	if err := w.Close(); err != nil {
		return nil, storeError(err)
	}
	if got != h.GetSize() {
		return nil, fmt.Errorf("the upload ended after %d of the %d bytes the header declared: %w", got, h.GetSize(), ErrInvalidArgument)
	}
	if sum := hex.EncodeToString(hash.Sum(nil)); sum != want {
		return nil, fmt.Errorf("the archive's sha256 is %s, not %s as the header says: the upload was corrupted or the header is wrong: %w", sum, want, ErrInvalidArgument)
	}
	// Flushing the file to disk and checking the archive both take a while
	// for a large upload; they run side by side (the check reads the
	// bytes back from the page cache).
	received := time.Since(began)
	synced := make(chan error, 1)
	go func() {
		start := time.Now()
		err := tmp.Sync()
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		d.log.Debug("upload flushed", "name", name, "took", time.Since(start))
		synced <- err
	}()
	man, err := experiment.Inspect(tmpPath, d.cfg.ArchiveLimits)
	serr := <-synced
	if err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, storeError(serr)
	}
	d.log.Debug("upload checked", "owner", owner, "name", name, "bytes", got, "receive", received, "check", time.Since(began)-received)
	if string(man.Plan) != h.GetPlanYaml() {
		return nil, fmt.Errorf("the header's plan differs from the archive's %s: send the archive's plan.yaml byte for byte: %w", experiment.PlanFile, ErrInvalidArgument)
	}
	// Only built-in models get an initial model from the aggregator, and an
	// evaluation scores the one it is given; an experiment without the
	// model it needs could never start, after every site had downloaded
	// and reviewed it.
	if need := plan.InitialModelNeed(); need != "" && !slices.ContainsFunc(man.Files, func(f experiment.FileInfo) bool { return f.Path == InitialModelFile }) {
		return nil, fmt.Errorf("the archive has no %s at its root: %s: %w", InitialModelFile, need, ErrInvalidArgument)
	}
	if err := d.checkDiskBudget(plan, man); err != nil {
		return nil, err
	}

	id := newID()
	dir := d.experimentDir(id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, storeError(err)
	}
	if err := os.Rename(tmpPath, d.archivePath(id)); err != nil {
		_ = os.RemoveAll(dir)
		return nil, storeError(err)
	}
	committed = true
	// The record written next promises the archive exists; make its name
	// durable first.
	if err := syncDir(dir); err != nil {
		_ = os.RemoveAll(dir)
		return nil, storeError(err)
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	// Creation times order listings; they are made strictly increasing so
	// that two submissions within one clock tick still list in order.
	now := d.clock.Now()
	for _, e := range d.exps {
		if !now.After(e.rec.CreatedAt) {
			now = e.rec.CreatedAt.Add(time.Nanosecond)
		}
	}
	rec := store.Experiment{
		ID: id, Name: name, Owner: owner, State: fxv1.ExperimentState_PENDING,
		PlanYAML: h.GetPlanYaml(), ArchiveSize: got, ArchiveSHA256: want,
		CreatedAt: now, Rounds: plan.Rounds,
	}
	e := newExpState(rec, plan)
	if err := d.saveLocked(e, rec); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	d.exps[id] = e
	d.traceSubmission(e, started)
	d.log.Info("experiment submitted", "experiment", id, "name", name, "owner", owner, "bytes", got)
	if d.cfg.ReviewPolicy == ReviewAuto {
		if err := d.approveLocked(e); err != nil {
			d.log.Error("cannot queue experiment", "experiment", id, "error", err)
		}
	}
	return d.toProtoLocked(e), nil
}

// storeError is a failure to store an upload. A full or failing disk is
// the director's resource running out (RESOURCE_EXHAUSTED), not a fault in
// the upload, and the message says so.
func storeError(err error) error {
	if disk.IsResourceError(err) {
		return fmt.Errorf("cannot store the upload: the director's disk is full or failing (%v): submit again later, or ask the operator for room: %w", err, ErrTooLarge)
	}
	return fmt.Errorf("cannot store the upload: %w", err)
}

// checkDiskBudget refuses an experiment whose files would not fit on the
// director's disk beside DiskReserve (the archive is there already): the
// models its retention keeps, each the size of the archive's initial
// model, two rounds of a server optimiser's state (twice the model each),
// and a summary per round. A built-in model's size is known only once its
// participants are, so for one without an initial model only the
// summaries count here; the aggregator checks the room for each round
// before it starts it, and pauses the experiment when there is none.
func (d *Director) checkDiskBudget(plan *experiment.Plan, man *experiment.Manifest) error {
	free, ok := disk.Free(d.cfg.DataDir)
	if !ok {
		return nil
	}
	var model int64
	for _, f := range man.Files {
		if f.Path == InitialModelFile {
			model = f.Size
		}
	}
	kept := int64(plan.KeptModels())
	need := kept * model
	switch plan.Aggregation.Algorithm {
	case experiment.AlgFedAdam, experiment.AlgFedYogi, experiment.AlgFedAdagrad:
		need += 2 * 2 * model
	}
	// A result in a summary takes a few hundred bytes.
	sites := int64(max(plan.Participants.Min, len(plan.Participants.Envoys)))
	need += int64(plan.Rounds+1) * sites * int64(len(plan.Tasks)) * 1024
	if free-need >= d.cfg.DiskReserve {
		return nil
	}
	return fmt.Errorf("the experiment needs about %d bytes on the director's disk (%d models of %d bytes kept for rounds: %d and retention.every: %d, and its round summaries), but it has %d bytes free beyond the %d it keeps in reserve (disk_reserve_bytes): keep fewer models (retention.every: 0 keeps the initial, the best and the last two; N keeps every Nth besides), run fewer rounds, or ask the operator for room: %w",
		need, kept, model, plan.Rounds, plan.Retention.Every, max(free-d.cfg.DiskReserve, 0), d.cfg.DiskReserve, ErrTooLarge)
}

// startUpload counts an upload of owner's until done is called, refusing
// one beyond MaxUploadsPerResearcher: every upload holds a handler, a
// temporary file and up to MaxArchiveBytes of disk until it ends, so one
// researcher must not be able to start them without bound.
func (d *Director) startUpload(owner string) (done func(), err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if n := d.uploads[owner]; n >= d.cfg.MaxUploadsPerResearcher {
		return nil, fmt.Errorf("you have %d uploads in progress, as many as this director takes from one researcher at once (max_uploads_per_researcher): submit again when one has finished: %w", n, ErrBusy)
	}
	d.uploads[owner]++
	return func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.uploads[owner]--; d.uploads[owner] == 0 {
			delete(d.uploads, owner)
		}
	}, nil
}

// nameFreeLocked refuses a name the owner already uses, or is uploading.
func (d *Director) nameFreeLocked(owner, name string) error {
	if d.reserved[owner+"/"+name] {
		return fmt.Errorf("an upload of experiment %q is already in progress: %w", name, ErrAlreadyExists)
	}
	for _, e := range d.exps {
		if e.rec.Owner == owner && e.rec.Name == name {
			return fmt.Errorf("you already have an experiment named %q (id %s, %s): remove it or choose another name: %w", name, e.rec.ID, e.rec.State, ErrAlreadyExists)
		}
	}
	return nil
}

// newID is a random, URL-safe experiment id (26 characters of base32).
func newID() string { return strings.ToLower(rand.Text()) }

// uploadQueue is how many received chunks may wait to be written.
const uploadQueue = 4

// asyncWriter writes in a goroutine of its own. Write hands over the slice
// (the caller must not reuse it); the first write error is returned by the
// next Write and by Close.
type asyncWriter struct {
	ch     chan []byte
	done   chan struct{}
	mu     sync.Mutex
	err    error
	closed bool
}

func newAsyncWriter(w io.Writer, depth int) *asyncWriter {
	a := &asyncWriter{ch: make(chan []byte, depth), done: make(chan struct{})}
	go func() {
		defer close(a.done)
		for b := range a.ch {
			if a.failed() != nil {
				continue
			}
			if _, err := w.Write(b); err != nil {
				a.mu.Lock()
				a.err = err
				a.mu.Unlock()
			}
		}
	}()
	return a
}

func (a *asyncWriter) failed() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.err
}

func (a *asyncWriter) Write(b []byte) (int, error) {
	if err := a.failed(); err != nil {
		return 0, err
	}
	a.ch <- b
	return len(b), nil
}

// Close waits for every handed-over chunk to be written. It is safe to
// call more than once.
func (a *asyncWriter) Close() error {
	a.mu.Lock()
	if !a.closed {
		a.closed = true
		close(a.ch)
	}
	a.mu.Unlock()
	<-a.done
	return a.failed()
}

// syncDir fsyncs a directory, making the names created in it durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// idleStream receives in a goroutine of its own so that an upload whose
// client stops sending, without closing the stream, can be abandoned after
// idle: otherwise it would hold its name, its temporary file and a handler
// for as long as the client keeps the connection open. At most one message
// waits between the goroutine and the reader.
type idleStream struct {
	ctx  context.Context
	idle time.Duration
	ch   chan recvResult
}

type recvResult struct {
	msg *fxv1.SubmitExperimentRequest
	err error
}

// newIdleStream starts receiving from s; the goroutine ends when s fails,
// which it does once the handler returns and the stream's context ends.
func newIdleStream(ctx context.Context, s submitStream, idle time.Duration) *idleStream {
	is := &idleStream{ctx: ctx, idle: idle, ch: make(chan recvResult, 1)}
	go func() {
		for {
			msg, err := s.Recv()
			select {
			case is.ch <- recvResult{msg, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return is
}

func (is *idleStream) Recv() (*fxv1.SubmitExperimentRequest, error) {
	t := time.NewTimer(is.idle)
	defer t.Stop()
	select {
	case r := <-is.ch:
		return r.msg, r.err
	case <-t.C:
		return nil, fmt.Errorf("no data for %s: the upload was abandoned; send it again: %w", is.idle, context.DeadlineExceeded)
	case <-is.ctx.Done():
		return nil, is.ctx.Err()
	}
}
