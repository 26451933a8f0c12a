package experiment

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"

	"google.golang.org/grpc"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// ModelSelector picks one of an experiment's kept models: SelectBest,
// SelectLast or SelectRound(n).
type ModelSelector struct {
	which fxv1.ModelSelector
	round int32
}

// The selectors.
var (
	// SelectBest is the model of the round that scored best on the plan's
	// best_model metric.
	SelectBest = ModelSelector{which: fxv1.ModelSelector_BEST}
	// SelectLast is the last completed round's model.
	SelectLast = ModelSelector{which: fxv1.ModelSelector_LAST}
)

// SelectRound picks the model after round n; 0 is the initial model.
func SelectRound(n int) ModelSelector {
	return ModelSelector{which: fxv1.ModelSelector_ROUND, round: int32(n)}
}

// String names the selection for messages: "best", "last", "round 3".
func (s ModelSelector) String() string {
	switch s.which {
	case fxv1.ModelSelector_BEST:
		return "best"
	case fxv1.ModelSelector_LAST:
		return "last"
	case fxv1.ModelSelector_ROUND:
		return fmt.Sprintf("round %d", s.round)
	}
	return "unspecified"
}

// maxInMemoryModel bounds Model's buffer: a bigger model should go to a
// file with ModelToFile.
const maxInMemoryModel = 4 << 30

// Model downloads a model into memory, checks its size and sha256 against
// the ModelInfo the director sent first, and decodes it. The info carries
// the round and that round's aggregated validation metrics.
func (c *Client) Model(ctx context.Context, name string, sel ModelSelector) (tensor.Model, *fxv1.ModelInfo, error) {
	var buf bytes.Buffer
	info, err := c.download(ctx, name, sel, func(info *fxv1.ModelInfo) (io.Writer, error) {
		if info.GetSize() > maxInMemoryModel {
			return nil, fmt.Errorf("the model is %d bytes: download it to a file with ModelToFile", info.GetSize())
		}
		buf.Grow(int(info.GetSize()))
		return &buf, nil
	})
	if err != nil {
		return nil, nil, err
	}
	m, _, err := tensor.Read(&buf)
	if err != nil {
		return nil, nil, fmt.Errorf("decoding the %s model of experiment %s: %w", sel, name, err)
	}
	return m, info, nil
}

// ModelToFile streams a model to path: into a temporary file beside it,
// checked against the ModelInfo's size and sha256, synced, then renamed
// over path. An interrupted or corrupt download leaves path as it was.
func (c *Client) ModelToFile(ctx context.Context, name string, sel ModelSelector, path string) (info *fxv1.ModelInfo, err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".part-*")
	if err != nil {
		return nil, fmt.Errorf("downloading the %s model of experiment %s: %w", sel, name, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	info, err = c.download(ctx, name, sel, func(*fxv1.ModelInfo) (io.Writer, error) { return tmp, nil })
	if err != nil {
		return nil, err
	}
	if err := tmp.Sync(); err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	return info, nil
}

// download reads a DownloadModel stream into the writer open returns for
// its ModelInfo, refusing more bytes than the info announced and checking
// the size and digest at the end.
func (c *Client) download(ctx context.Context, name string, sel ModelSelector, open func(*fxv1.ModelInfo) (io.Writer, error)) (*fxv1.ModelInfo, error) {
	op := fmt.Sprintf("downloading the %s model of experiment %s", sel, name)
	if sel.which == fxv1.ModelSelector_MODEL_SELECTOR_UNSPECIFIED {
		return nil, fmt.Errorf("%s: choose SelectBest, SelectLast or SelectRound(n)", op)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Fail fast: a director that is away is reported at once rather than
	// waited for without bound (the context may have no deadline).
	stream, err := c.rpc.DownloadModel(sctx, &fxv1.DownloadModelRequest{Experiment: Ref(name), Selector: sel.which, Round: sel.round})
	if err != nil {
		return nil, c.wrap(op, err)
	}
	first, err := stream.Recv()
	if errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%s: the director ended the download before describing the model", op)
	}
	if err != nil {
		return nil, c.wrap(op, err)
	}
	info := first.GetInfo()
	if info == nil {
		return nil, fmt.Errorf("%s: the director sent model bytes before the model's description", op)
	}
	w, err := open(info)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	h := sha256.New()
	got, err := copyModel(stream, io.MultiWriter(w, h), info.GetSize())
	if err != nil {
		return nil, c.wrap(op, err)
	}
	if got != info.GetSize() {
		return nil, fmt.Errorf("%s: received %d bytes, the director announced %d: the download was cut short", op, got, info.GetSize())
	}
	if sum := hexSum(h); sum != info.GetSha256() {
		return nil, fmt.Errorf("%s: the model's sha256 is %s, the director announced %s: the download is corrupt", op, sum, info.GetSha256())
	}
	return info, nil
}

func copyModel(stream grpc.ServerStreamingClient[fxv1.DownloadModelResponse], w io.Writer, size int64) (int64, error) {
	var n int64
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		chunk := m.GetChunk()
		if m.GetInfo() != nil {
			return n, errors.New("the director described the model twice")
		}
		if n+int64(len(chunk)) > size {
			return n, fmt.Errorf("the director sent more than the %d bytes it announced", size)
		}
		if _, err := w.Write(chunk); err != nil {
			return n, fmt.Errorf("writing the model: %w", err)
		}
		n += int64(len(chunk))
	}
}

func hexSum(h hash.Hash) string { return hex.EncodeToString(h.Sum(nil)) }
