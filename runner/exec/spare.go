package exec

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/fx-fl/fx/tensor"
)

// maxSpareFiles is how many unneeded model files are kept for reuse: the
// one a new model is about to be written over (see persistent.makeRoom).
const maxSpareFiles = 1

// spareFiles are model files the runner no longer needs, kept to be
// overwritten in place by the next model handed over or trained. Writing a
// new file of a large model makes the kernel find fresh memory for every
// page, and under some hypervisors that costs several times the copy
// itself (a 512 MiB model: 0.4–2.3 s into a new file, 0.1 s over an old
// one); an old file's pages are already in memory. Each round hands the
// runner one model and takes back one, each over the file of the model
// that round made useless.
type spareFiles struct{ paths []string }

// keep takes path, a file no longer needed, as a spare, or removes it when
// enough are kept.
func (s *spareFiles) keep(path string) {
	if len(s.paths) >= maxSpareFiles {
		os.Remove(path)
		return
	}
	s.paths = append(s.paths, path)
}

// lend hands out a spare for the runner to overwrite with its trained
// model, or "" when there is none. Its header is zeroed first: a runner
// that renames it and writes nothing leaves a file that is no model at
// all, not an old model that would pass for trained weights.
func (s *spareFiles) lend() string {
	for len(s.paths) > 0 {
		path := s.paths[len(s.paths)-1]
		s.paths = s.paths[:len(s.paths)-1]
		if err := zeroHeader(path); err == nil {
			return path
		}
		os.Remove(path)
	}
	return ""
}

// returned takes back a lent spare the runner did not use (it wrote a new
// file), if it is still there.
func (s *spareFiles) returned(path string) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode().IsRegular() {
		s.keep(path)
	}
}

// write writes model to path for the runner, over a spare when there is
// one, else to a new file.
func (s *spareFiles) write(path string, model tensor.Model) error {
	for len(s.paths) > 0 {
		spare := s.paths[len(s.paths)-1]
		s.paths = s.paths[:len(s.paths)-1]
		if err := os.Rename(spare, path); err != nil {
			os.Remove(spare)
			continue
		}
		if err := overwrite(path, model); err != nil {
			os.Remove(path)
			return err
		}
		return nil
	}
	return tensor.WriteScratchFile(path, model, nil)
}

// overwrite writes model over the file at path, in place, and cuts the
// file to the model's length. Nobody reads the file meanwhile: it is
// handed to the runner only after this returns.
func overwrite(path string, model tensor.Model) (err error) {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	if err := tensor.Write(bw, model, nil); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	end, err := f.Seek(0, io.SeekCurrent)
	if err != nil {
		return err
	}
	return f.Truncate(end)
}

// zeroHeader overwrites the length of path's safetensors header with
// zeros, which no reader takes for a model.
func zeroHeader(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, werr := f.WriteAt(make([]byte, 8), 0)
	return errors.Join(werr, f.Close())
}
