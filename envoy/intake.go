package envoy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/backoff"
	"github.com/fx-fl/fx/internal/idle"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// errOfferClosed means the director no longer offers the experiment (it
// started without this envoy, ended, or was removed): there is nothing to
// answer.
var errOfferClosed = errors.New("the offer is closed")

// digestError is a downloaded archive whose bytes do not hash to the
// offer's digest.
type digestError struct{ want, got string }

func (d *digestError) Error() string {
	return fmt.Sprintf("archive sha256 mismatch: the offer announces %s but the downloaded bytes hash to %s", d.want, d.got)
}

// intake reviews one offer: download and verify the archive, unpack it
// safely, check the plan can run here, apply the data owner's policy, and
// answer. The decision is recorded before it is sent, so an envoy restarted
// in between answers the replayed offer the same way.
func (e *Envoy) intake(ctx context.Context, x *exp, done chan struct{}) {
	e.mu.Lock()
	rec := x.rec
	e.mu.Unlock()
	log := e.log.With("experiment", rec.ID, "name", rec.Name)
	if err := e.saveRecord(rec); err != nil {
		log.Error("cannot record the offer; it stays unanswered until the director offers it again", "error", err)
		e.forget(x, done)
		return
	}
	d, err := e.review(ctx, x, done)
	switch {
	case ctx.Err() != nil:
		return // stopped, or the envoy is shutting down; the replayed offer resumes
	case errors.Is(err, errOfferClosed):
		log.Info("the director withdrew the offer", "error", err)
		e.forget(x, done)
		e.removeDir(rec.ID)
		return
	case err != nil:
		log.Error("cannot review the offer; it stays unanswered until the director offers it again", "error", err)
		e.forget(x, done)
		return
	}
	if !d.accept {
		// A rejected archive is of no use here; the record stays until the
		// director has the answer.
		os.Remove(filepath.Join(e.expDir(rec.ID), archiveFile))
		os.Remove(filepath.Join(e.expDir(rec.ID), partFile))
		os.RemoveAll(filepath.Join(e.expDir(rec.ID), filesDir))
	}
	rec.Decision, rec.Reason = decisionReject, d.reason
	if d.accept {
		rec.Decision = decisionAccept
	}
	if err := e.saveRecord(rec); err != nil {
		log.Error("cannot record the decision; it stays unanswered until the director offers it again", "error", err)
		e.forget(x, done)
		return
	}
	e.mu.Lock()
	if current(x, done) {
		x.rec = rec
		x.phase = phaseRejected
		if d.accept {
			x.phase = phaseAccepted
		}
		x.answering = true
	}
	e.mu.Unlock()
	log.Info("offer decided", "accept", d.accept, "reason", d.reason)
	delivered := e.answer(ctx, rec.ID, d)
	e.mu.Lock()
	x.answering = false
	e.mu.Unlock()
	if delivered && !d.accept {
		e.dropRejected(x)
	}
}

// forget drops an experiment whose review could not finish, so that the
// director's next replay of the offer starts a new review.
func (e *Envoy) forget(x *exp, done chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if cur, ok := e.exps[x.rec.ID]; ok && cur == x && current(x, done) {
		delete(e.exps, x.rec.ID)
	}
}

// review reaches a decision on the offer. An error means no decision could
// be reached (the offer closed, the work directory failed); a problem with
// the experiment itself is a rejection with the reason.
func (e *Envoy) review(ctx context.Context, x *exp, done chan struct{}) (decision, error) {
	e.mu.Lock()
	rec := x.rec
	e.mu.Unlock()
	offered, err := experiment.ParsePlanAnyAlgorithm([]byte(rec.PlanYAML))
	if err != nil {
		return decision{reason: fmt.Sprintf("the offered plan is invalid: %v", err)}, nil
	}
	// Before the download: a plan the privacy budget declines costs
	// nothing more.
	if reason := e.reviewPrivacy(rec, offered); reason != "" {
		return decision{reason: reason}, nil
	}
	if !isSHA256(rec.ArchiveSHA256) {
		return decision{reason: fmt.Sprintf("the offer's archive_sha256 %q is not a lower-case hex sha256", rec.ArchiveSHA256)}, nil
	}
	if rec.ArchiveSize <= 0 {
		return decision{reason: fmt.Sprintf("the offer's archive_size %d is not positive", rec.ArchiveSize)}, nil
	}
	if rec.ArchiveSize > e.cfg.MaxArchiveBytes {
		return decision{reason: fmt.Sprintf("the archive is %d bytes, over this site's limit of %d (max_archive_bytes)", rec.ArchiveSize, e.cfg.MaxArchiveBytes)}, nil
	}
	if err := e.fetchArchive(ctx, rec); err != nil {
		var de *digestError
		if errors.As(err, &de) {
			return decision{reason: err.Error()}, nil
		}
		return decision{}, err
	}
	plan, err := e.unpack(rec)
	if err != nil {
		if errors.Is(err, experiment.ErrInvalidArchive) || errors.Is(err, experiment.ErrTooLarge) || errors.Is(err, experiment.ErrInvalidPlan) {
			return decision{reason: err.Error()}, nil
		}
		return decision{}, err
	}
	e.mu.Lock()
	x.plan = plan
	e.mu.Unlock()
	// What the runner prints while it starts is shared too (where the site
	// shares it): it is what tells a researcher why it could not.
	output, stopSharing := e.shareOutput(ctx, rec.ID)
	defer stopSharing()
	r, err := e.newRunner(e.runnerInput(rec.ID, plan, output))
	if err != nil {
		return decision{reason: fmt.Sprintf("this site cannot run the plan: %v", err)}, nil
	}
	defer closeRunner(r)
	d, err := e.applyPolicy(ctx, x, done, rec)
	if err != nil || !d.accept {
		return d, err
	}
	// Only code the policy accepted runs, and only now: started once, a
	// runner that cannot import what it needs declines the offer instead
	// of failing the experiment's first round.
	if c, ok := r.(checker); ok {
		if err := c.Check(ctx); err != nil {
			if ctx.Err() != nil {
				return decision{}, ctx.Err()
			}
			return decision{reason: "this site cannot start the experiment's runner: " + e.publicReason(err)}, nil
		}
	}
	return d, nil
}

// applyPolicy applies the data owner's review policy to a verified offer.
func (e *Envoy) applyPolicy(ctx context.Context, x *exp, done chan struct{}, rec record) (decision, error) {
	switch e.cfg.Review.Policy {
	case PolicyAuto:
		return decision{accept: true, reason: "accepted by the site's auto review policy"}, nil
	case PolicyAllowlist:
		allowed, err := ReadAllowlist(e.cfg.Review.Allowlist)
		if err != nil {
			// The owner broke the file after start-up: refuse rather than
			// guess, and say why.
			return decision{reason: fmt.Sprintf("the site's allow-list cannot be read: %v", err)}, nil
		}
		if allowed[rec.ArchiveSHA256] {
			return decision{accept: true, reason: "the archive's sha256 is on the site's allow-list"}, nil
		}
		return decision{reason: fmt.Sprintf("the archive's sha256 %s is not on the site's allow-list", rec.ArchiveSHA256)}, nil
	default:
		return e.awaitOwner(ctx, x, done)
	}
}

// awaitOwner holds a reviewed offer until the data owner decides through
// the admin socket, the offer's answer time passes, or ctx ends. Only this
// goroutine waits: other offers and experiments go on.
func (e *Envoy) awaitOwner(ctx context.Context, x *exp, done chan struct{}) (decision, error) {
	e.mu.Lock()
	if current(x, done) {
		x.phase = phasePending
	}
	rec := x.rec
	e.mu.Unlock()
	e.log.Info("offer awaits the data owner's decision: run `fx envoy pending`, then `fx envoy approve` or `fx envoy reject`",
		"experiment", rec.ID, "name", rec.Name, "owner", rec.Owner)
	var expire <-chan time.Time
	if !rec.AnswerBy.IsZero() {
		t := time.NewTimer(time.Until(rec.AnswerBy))
		defer t.Stop()
		expire = t.C
	}
	select {
	case d := <-x.decide:
		return d, nil
	case <-expire:
		return decision{}, fmt.Errorf("%w: no decision before its answer time %s", errOfferClosed, rec.AnswerBy.Format(time.RFC3339))
	case <-ctx.Done():
		return decision{}, ctx.Err()
	}
}

// fetchArchive makes sure the experiment's verified archive is on disk,
// downloading what is missing. An interrupted download keeps its partial
// file and resumes at its size. A complete file whose digest does not
// match is discarded and downloaded once more from the start, since a
// partial file left by a crash may be what is wrong; a second mismatch is
// the archive itself (or the director) at fault, and the offer is rejected.
func (e *Envoy) fetchArchive(ctx context.Context, rec record) error {
	final := filepath.Join(e.expDir(rec.ID), archiveFile)
	part := filepath.Join(e.expDir(rec.ID), partFile)
	if _, err := os.Stat(final); err == nil {
		if err := verifyFile(final, rec); err == nil {
			return nil
		}
		os.Remove(final)
	}
	b := backoff.New(e.cfg.Retry.schedule())
	mismatches := 0
	for {
		err := e.downloadOnce(ctx, rec, part)
		if err == nil {
			err = verifyFile(part, rec)
			var de *digestError
			if errors.As(err, &de) {
				os.Remove(part)
				if mismatches++; mismatches >= 2 {
					return err
				}
				e.log.Warn("downloaded archive does not match its digest; downloading it again from the start", "experiment", rec.ID, "error", err)
				continue
			}
			if err != nil {
				return err
			}
			if err := os.Rename(part, final); err != nil {
				return fmt.Errorf("keeping the verified archive: %w", err)
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch status.Code(err) {
		case codes.NotFound, codes.FailedPrecondition, codes.PermissionDenied:
			return fmt.Errorf("%w: %w", errOfferClosed, err)
		case codes.OutOfRange:
			// The partial file is longer than the director's archive: it
			// is not a prefix of it. Start over.
			os.Remove(part)
		}
		if !rec.AnswerBy.IsZero() && time.Now().After(rec.AnswerBy) {
			return fmt.Errorf("%w: the download did not complete before the answer time: %w", errOfferClosed, err)
		}
		e.log.Debug("archive download interrupted; resuming", "experiment", rec.ID, "error", err)
		if !b.Wait(ctx) {
			return ctx.Err()
		}
	}
}

// downloadOnce appends to the partial file from its current size until the
// director's stream ends. A stream silent for longer than the RPC timeout is
// abandoned, so a hung connection cannot stall an offer.
func (e *Envoy) downloadOnce(ctx context.Context, rec record, part string) error {
	f, err := os.OpenFile(part, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("opening the partial archive: %w", err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("opening the partial archive: %w", err)
	}
	if size > rec.ArchiveSize {
		if err := f.Truncate(0); err != nil {
			return fmt.Errorf("truncating the partial archive: %w", err)
		}
		size, _ = f.Seek(0, io.SeekStart)
	}
	if size == rec.ArchiveSize {
		return nil
	}
	sctx, progress, stop := idle.Watch(ctx, e.cfg.RPCTimeout)
	defer stop()
	stream, err := e.client.DownloadArchive(sctx, &fxv1.DownloadArchiveRequest{ExperimentId: rec.ID, Offset: size})
	if err != nil {
		return err
	}
	if size > 0 {
		e.log.Info("resuming the archive download", "experiment", rec.ID, "offset", size, "size", rec.ArchiveSize)
	}
	for {
		chunk, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			if stall := idle.Stalled(sctx); stall != nil {
				return fmt.Errorf("the download stalled at byte %d: %w", size, stall)
			}
			return err
		}
		progress()
		if chunk.GetOffset() != size {
			return fmt.Errorf("the director sent bytes at offset %d, expected %d", chunk.GetOffset(), size)
		}
		if size+int64(len(chunk.GetData())) > rec.ArchiveSize {
			return fmt.Errorf("the director sent more than the %d bytes the offer announces", rec.ArchiveSize)
		}
		if _, err := f.Write(chunk.GetData()); err != nil {
			return fmt.Errorf("writing the archive: %w", err)
		}
		size += int64(len(chunk.GetData()))
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("writing the archive: %w", err)
	}
	if size != rec.ArchiveSize {
		return fmt.Errorf("the download ended at byte %d of %d", size, rec.ArchiveSize)
	}
	return nil
}

// verifyFile checks an archive's size and sha256 against the offer.
func verifyFile(path string, rec record) error {
	n, got, err := experiment.HashFile(path)
	if err != nil {
		return fmt.Errorf("verifying the archive: %w", err)
	}
	if n != rec.ArchiveSize || got != rec.ArchiveSHA256 {
		return &digestError{want: rec.ArchiveSHA256, got: got}
	}
	return nil
}

// unpack extracts the verified archive with the director's safety rules
// (no links, no paths leaving the root, size limits) and reads its plan. An
// earlier complete unpack is reused.
func (e *Envoy) unpack(rec record) (*experiment.Plan, error) {
	dest := filepath.Join(e.expDir(rec.ID), filesDir)
	if plan, err := e.unpackedPlan(rec.ID); err == nil {
		return plan, nil
	}
	if err := os.RemoveAll(dest); err != nil {
		return nil, fmt.Errorf("clearing %s: %w", dest, err)
	}
	m, err := experiment.Unpack(filepath.Join(e.expDir(rec.ID), archiveFile), dest, experiment.DefaultLimits())
	if err != nil {
		return nil, err
	}
	if string(m.Plan) != rec.PlanYAML {
		// The owner reviews the offer's plan; what runs is the archive's.
		// They must be the same text (the director checks this at submission).
		os.RemoveAll(dest)
		return nil, fmt.Errorf("%w: the archive's plan.yaml differs from the plan in the offer", experiment.ErrInvalidArchive)
	}
	plan, err := experiment.ParsePlanAnyAlgorithm(m.Plan)
	if err != nil {
		return nil, fmt.Errorf("the archive's plan.yaml: %w", err)
	}
	return plan, nil
}
