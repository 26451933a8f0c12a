// Package atomicfile writes files so that a crash at any moment leaves either
// the old contents or the new, never a mix: the data goes to a temporary file
// in the same directory, is synced, and is renamed over the target, and the
// rename is synced too.
package atomicfile

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// WriteFile atomically replaces path with data, creating its directory
// (0700) if needed. The file gets mode 0600. It is durable: synced before and
// after the rename.
func WriteFile(path string, data []byte) error { return write(path, data, true) }

// Replace is WriteFile without the syncs: readers never see a partial file
// and a crash of the process loses nothing, but a crash of the machine may
// lose the update. For state that can be recomputed, where a sync on every
// write would cost more than it saves.
func Replace(path string, data []byte) error { return write(path, data, false) }

// Stream is WriteFile for contents too large to hold in memory (models,
// copies of a database): fn writes them to w, buffered, and only if it
// returns nil is the file synced and renamed over path.
func Stream(path string, fn func(w io.Writer) error) error {
	return stream(path, true, func(f *os.File) error {
		bw := bufio.NewWriterSize(f, 1<<20)
		if err := fn(bw); err != nil {
			return err
		}
		return bw.Flush()
	})
}

func write(path string, data []byte, durable bool) error {
	return stream(path, durable, func(f *os.File) error {
		_, err := f.Write(data)
		return err
	})
}

func stream(path string, durable bool, fill func(*os.File) error) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if err := fill(tmp); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if durable {
		if err := tmp.Sync(); err != nil {
			tmp.Close()
			return fmt.Errorf("sync %s: %w", path, err)
		}
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("install %s: %w", path, err)
	}
	if !durable {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// WriteJSON atomically and durably replaces path with v as indented JSON.
func WriteJSON(path string, v any) error {
	data, err := encode(path, v)
	if err != nil {
		return err
	}
	return WriteFile(path, data)
}

// ReplaceJSON is WriteJSON without the syncs; see Replace.
func ReplaceJSON(path string, v any) error {
	data, err := encode(path, v)
	if err != nil {
		return err
	}
	return Replace(path, data)
}

func encode(path string, v any) ([]byte, error) {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", path, err)
	}
	return append(data, '\n'), nil
}
