package dashboard

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// errHeadOnly stops a HEAD request's download once the headers are known.
var errHeadOnly = errors.New("HEAD: headers only")

// model is GET /api/experiments/OWNER/NAME/model/{best|last|ROUND}: the
// model as a safetensors attachment, streamed from the director as it
// arrives (never held whole in memory), with its size (Content-Length),
// sha256 (Content-Digest, and X-Fx-Model-Sha256 in hex) and round
// (X-Fx-Model-Round). Its name is NAME-best-roundR.safetensors,
// NAME-last-roundR.safetensors or NAME-roundR.safetensors, prefixed with
// OWNER- for another researcher's.
//
// The client checks the size and sha256 only after the last byte, so the
// last byte is held back until the check passes; a download that fails on
// the way is cut off (the connection reset), which the browser reports as
// a failed download rather than keeping a short or corrupt file.
func (s *Server) model(w http.ResponseWriter, r *http.Request) {
	owner, name, which := r.PathValue("owner"), r.PathValue("name"), r.PathValue("which")
	var sel experiment.ModelSelector
	switch which {
	case "best":
		sel = experiment.SelectBest
	case "last":
		sel = experiment.SelectLast
	default:
		n, err := strconv.Atoi(which)
		if err != nil || n < 0 {
			writeJSONError(w, http.StatusBadRequest, "InvalidArgument", fmt.Sprintf("model %q: choose best, last or a round number (0: the initial model)", which))
			return
		}
		sel, which = experiment.SelectRound(n), ""
	}
	prefix := name
	if owner != s.c.Identity().Name {
		prefix = owner + "-" + name
	}
	started := false
	hold := &holdBack{w: w}
	_, err := s.c.ModelStream(r.Context(), ref(r), sel, func(info *fxv1.ModelInfo) (io.Writer, error) {
		file := fmt.Sprintf("%s-round%d.safetensors", prefix, info.GetRound())
		if which != "" {
			file = fmt.Sprintf("%s-%s-round%d.safetensors", prefix, which, info.GetRound())
		}
		h := w.Header()
		h.Set("Content-Type", "application/octet-stream")
		h.Set("Content-Length", strconv.FormatInt(info.GetSize(), 10))
		h.Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": file}))
		h.Set("Cache-Control", "no-store")
		h.Set("X-Fx-Model-Round", strconv.Itoa(int(info.GetRound())))
		h.Set("X-Fx-Model-Sha256", info.GetSha256())
		if sum, err := hex.DecodeString(info.GetSha256()); err == nil {
			h.Set("Content-Digest", "sha-256=:"+base64.StdEncoding.EncodeToString(sum)+":")
		}
		w.WriteHeader(http.StatusOK)
		started = true
		if r.Method == http.MethodHead {
			return nil, errHeadOnly
		}
		return hold, nil
	})
	switch {
	case errors.Is(err, errHeadOnly):
		return
	case err != nil && !started:
		s.fail(w, r, err)
		return
	case err != nil:
		if r.Context().Err() == nil {
			s.log.Warn("model download failed after it started: cutting the connection", "path", r.URL.Path, "error", err)
		}
		panic(http.ErrAbortHandler)
	}
	if err := hold.release(); err != nil {
		s.log.Debug("model download: the browser went away", "path", r.URL.Path, "error", err)
	}
}

// holdBack passes writes on but keeps the last byte written, until release:
// with Content-Length set, the browser does not take the file for complete
// before the digest has been checked.
type holdBack struct {
	w       io.Writer
	pending []byte
}

func (h *holdBack) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if len(h.pending) > 0 {
		if _, err := h.w.Write(h.pending); err != nil {
			return 0, err
		}
		h.pending = h.pending[:0]
	}
	if _, err := h.w.Write(p[:len(p)-1]); err != nil {
		return 0, err
	}
	h.pending = append(h.pending, p[len(p)-1])
	return len(p), nil
}

func (h *holdBack) release() error {
	if len(h.pending) == 0 {
		return nil
	}
	_, err := h.w.Write(h.pending)
	h.pending = nil
	return err
}
