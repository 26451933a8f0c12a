package experiment

import (
	"archive/tar"
	"archive/zip"
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// The two classes of archive errors. Every error Inspect and Unpack return
// because of what the archive holds matches exactly one of them (errors.Is),
// so a service maps ErrInvalidArchive to InvalidArgument and ErrTooLarge to
// ResourceExhausted. Other errors are local failures (the archive cannot be
// opened, the destination cannot be written).
var (
	// ErrInvalidArchive: the archive is not a zip or tar.gz, is corrupt or
	// truncated, or holds something an experiment archive must not: a path
	// that leaves the root, a link, a device, a duplicate, no plan.yaml.
	ErrInvalidArchive = errors.New("invalid experiment archive")
	// ErrTooLarge: the archive breaks one of its Limits.
	ErrTooLarge = errors.New("experiment archive too large")
)

// Format is an archive's container format, detected from its first bytes.
type Format string

// The formats fx reads. Pack writes FormatTarGz.
const (
	FormatTarGz Format = "tar.gz"
	FormatZip   Format = "zip"
)

// Default limits: generous for code plus an initial model, small enough that
// one archive cannot fill a director's disk.
const (
	DefaultMaxFiles         = 10_000
	DefaultMaxUnpackedBytes = 4 << 30
	DefaultMaxFileBytes     = 2 << 30
)

// MaxPlanBytes caps plan.yaml, which is read into memory and parsed.
const MaxPlanBytes = 1 << 20

// maxTrailingBytes caps what a tar.gz may carry after the end of its tar
// stream (tar pads to 10 KiB records); it is read only to verify the gzip
// checksum.
const maxTrailingBytes = 1 << 20

// Limits bound what an archive may unpack to. They are checked against the
// bytes actually decompressed, not the sizes the archive's headers claim, so
// a header that lies cannot slip a bomb through. A zero or negative field
// means its default.
type Limits struct {
	// MaxFiles caps the number of entries (files and directories).
	MaxFiles int
	// MaxUnpackedBytes caps the total size of all files.
	MaxUnpackedBytes int64
	// MaxFileBytes caps the size of any one file.
	MaxFileBytes int64
}

// DefaultLimits returns the default limits.
func DefaultLimits() Limits {
	return Limits{MaxFiles: DefaultMaxFiles, MaxUnpackedBytes: DefaultMaxUnpackedBytes, MaxFileBytes: DefaultMaxFileBytes}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxFiles <= 0 {
		l.MaxFiles = d.MaxFiles
	}
	if l.MaxUnpackedBytes <= 0 {
		l.MaxUnpackedBytes = d.MaxUnpackedBytes
	}
	if l.MaxFileBytes <= 0 {
		l.MaxFileBytes = d.MaxFileBytes
	}
	return l
}

// FileInfo describes one regular file in an archive.
type FileInfo struct {
	// Path is slash-separated and relative to the experiment root (with
	// any single top-level directory already stripped).
	Path string
	// Size is the number of bytes the file unpacks to.
	Size int64
	// Executable reports whether the archive marks the file executable
	// (owner exec bit); Unpack keeps that bit so exec runners can start
	// their scripts.
	Executable bool
	// SHA256 is the content's sha256, lower-case hex; set by Review only.
	SHA256 string
}

// Manifest is what an archive holds, as established by reading all of it.
type Manifest struct {
	Format Format
	// Root is the single top-level directory the archive's entries sat
	// under, which was stripped from every path; empty when plan.yaml was
	// at the archive's root.
	Root string
	// Files lists the regular files, sorted by path.
	Files []FileInfo
	// UnpackedBytes is the total size of Files.
	UnpackedBytes int64
	// Plan is the contents of plan.yaml (not yet parsed: see ParsePlan).
	Plan []byte
}

// Inspect reads the archive at path from start to end and validates every
// entry, writing nothing: the format (by magic bytes), entry types (regular
// files and directories only), paths (relative, no "..", no backslashes, no
// duplicates), the limits, the integrity of the compressed stream, and that
// plan.yaml is at the root or under a single top-level directory.
func Inspect(path string, limits Limits) (*Manifest, error) {
	return scanArchive(path, limits, discardSink{}, false)
}

// Review is Inspect for a person deciding whether to let an experiment
// run: it also hashes every file (FileInfo.SHA256), so what they read can
// be matched with what runs, and, when dest is not empty, unpacks the
// archive into dest for reading, exactly as Unpack does.
func Review(path, dest string, limits Limits) (*Manifest, error) {
	if dest == "" {
		return scanArchive(path, limits, discardSink{}, true)
	}
	return unpack(path, dest, limits, true)
}

// Unpack validates the archive at path as Inspect does and extracts it into
// dest, which must not exist or be an empty directory, and whose parent must
// exist. Directories are created 0700, files 0600, or 0700 when the archive
// marks them executable; nothing is ever written through a symbolic link.
//
// Unpack writes into a new temporary directory beside dest and renames it to
// dest only once every entry has been checked and written, so dest is either
// absent or complete, even if the process dies halfway. On any error it
// removes everything it created.
func Unpack(path, dest string, limits Limits) (*Manifest, error) {
	return unpack(path, dest, limits, false)
}

// unpack is Unpack, hashing every file when digests is set.
func unpack(path, dest string, limits Limits, digests bool) (m *Manifest, err error) {
	dest = filepath.Clean(dest)
	if err := checkDest(dest); err != nil {
		return nil, err
	}
	parent := filepath.Dir(dest)
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(dest)+".unpacking-")
	if err != nil {
		return nil, fmt.Errorf("unpacking into %s: %w", dest, err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	root, err := os.OpenRoot(tmp)
	if err != nil {
		return nil, fmt.Errorf("unpacking into %s: %w", dest, err)
	}
	m, err = scanArchive(path, limits, &diskSink{root: root}, digests)
	if cerr := root.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("unpacking into %s: %w", dest, cerr)
	}
	if err != nil {
		return nil, err
	}
	src := tmp
	if m.Root != "" {
		src = filepath.Join(tmp, m.Root)
	}
	if err := replaceDir(src, dest); err != nil {
		return nil, fmt.Errorf("unpacking into %s: moving the unpacked files in place: %w", dest, err)
	}
	if m.Root != "" {
		// Only the now-empty temporary directory is left; dest is complete
		// whatever happens to it.
		if err := os.Remove(tmp); err != nil {
			os.RemoveAll(dest)
			return nil, fmt.Errorf("unpacking into %s: removing %s: %w", dest, tmp, err)
		}
	}
	syncDir(parent)
	return m, nil
}

// checkDest refuses a destination that holds anything, so Unpack never
// mixes an archive with files already there.
func checkDest(dest string) error {
	fi, err := os.Lstat(dest)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("unpacking into %s: %w", dest, err)
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("unpacking into %s: it is a symbolic link: give a new directory", dest)
	case !fi.IsDir():
		return fmt.Errorf("unpacking into %s: it exists and is not a directory: give a new directory", dest)
	default:
		f, err := os.Open(dest)
		if err != nil {
			return fmt.Errorf("unpacking into %s: %w", dest, err)
		}
		names, err := f.Readdirnames(1)
		f.Close()
		if len(names) > 0 {
			return fmt.Errorf("unpacking into %s: it is not empty: give a new or empty directory", dest)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("unpacking into %s: %w", dest, err)
		}
	}
	parent := filepath.Dir(dest)
	pfi, err := os.Stat(parent)
	if err != nil {
		return fmt.Errorf("unpacking into %s: its parent directory: %w", dest, err)
	}
	if !pfi.IsDir() {
		return fmt.Errorf("unpacking into %s: %s is not a directory", dest, parent)
	}
	return nil
}

// replaceDir renames src to dest. os.Rename refuses to replace even an
// empty directory, so an empty dest is removed first (os.Remove fails on a
// directory something was written into meanwhile, so nothing is lost) and
// put back if the rename fails.
func replaceDir(src, dest string) error {
	removed := false
	if fi, err := os.Lstat(dest); err == nil && fi.IsDir() {
		if err := os.Remove(dest); err != nil {
			return err
		}
		removed = true
	}
	err := os.Rename(src, dest)
	if err != nil && removed {
		os.Mkdir(dest, 0o700)
	}
	return err
}

// syncDir makes a rename in dir durable. It is best effort: the rename has
// already happened, and failing Unpack now would leave dest behind.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// sink receives an archive's validated entries: discarded by Inspect,
// written by Unpack. Paths are cleaned, slash-separated and unstripped.
type sink interface {
	mkdir(p string) error
	create(p string, executable bool) (io.WriteCloser, error)
}

type discardSink struct{}

func (discardSink) mkdir(string) error { return nil }
func (discardSink) create(string, bool) (io.WriteCloser, error) {
	return nopWriteCloser{io.Discard}, nil
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

// diskSink writes through an os.Root, which refuses to resolve any path
// outside the temporary directory, symbolic links included: a second guard
// behind the path checks.
type diskSink struct{ root *os.Root }

func (d *diskSink) mkdir(p string) error {
	if err := d.root.MkdirAll(filepath.FromSlash(p), 0o700); err != nil {
		return fmt.Errorf("creating directory %s: %w", p, err)
	}
	return nil
}

func (d *diskSink) create(p string, executable bool) (io.WriteCloser, error) {
	if dir := path.Dir(p); dir != "." {
		if err := d.mkdir(dir); err != nil {
			return nil, err
		}
	}
	mode := os.FileMode(0o600)
	if executable {
		mode = 0o700
	}
	f, err := d.root.OpenFile(filepath.FromSlash(p), os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return nil, fmt.Errorf("creating %s: %w", p, err)
	}
	return syncCloser{f}, nil
}

// syncCloser flushes a file to disk before closing it, so the rename that
// publishes the directory never publishes empty files after a crash.
type syncCloser struct{ f *os.File }

func (s syncCloser) Write(b []byte) (int, error) { return s.f.Write(b) }
func (s syncCloser) Close() error {
	err := s.f.Sync()
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// scanArchive opens the archive, detects its format and feeds every entry
// through a scanner, which hashes every file when digests is set.
func scanArchive(name string, limits Limits, out sink, digests bool) (*Manifest, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("opening experiment archive: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("opening experiment archive: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("opening experiment archive: %s is not a regular file", name)
	}
	var magic [512]byte
	n, err := f.ReadAt(magic[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("reading experiment archive %s: %w", name, err)
	}
	format, err := detectFormat(magic[:n])
	if err != nil {
		return nil, err
	}
	s := &scanner{limits: limits.withDefaults(), sink: out, kinds: map[string]kind{}, single: true, digests: digests}
	switch format {
	case FormatZip:
		err = s.scanZip(f, fi.Size())
	default:
		err = s.scanTarGz(f)
	}
	if err != nil {
		return nil, err
	}
	return s.manifest(format)
}

func detectFormat(head []byte) (Format, error) {
	switch {
	case len(head) == 0:
		return "", fmt.Errorf("%w: the file is empty", ErrInvalidArchive)
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}):
		return FormatTarGz, nil
	case bytes.HasPrefix(head, []byte("PK\x03\x04")), bytes.HasPrefix(head, []byte("PK\x05\x06")):
		return FormatZip, nil
	case len(head) >= 262 && string(head[257:262]) == "ustar":
		return "", fmt.Errorf("%w: an uncompressed tar file: compress it with gzip (tar czf) or use fx's packer", ErrInvalidArchive)
	}
	return "", fmt.Errorf("%w: not a zip or tar.gz file (it does not start with their signatures)", ErrInvalidArchive)
}

type kind uint8

const (
	kindFile        kind = iota + 1
	kindDir              // an explicit directory entry
	kindImplicitDir      // a directory only implied by a deeper entry
)

// scanner checks entries one by one as they stream past and remembers what
// it needs to decide, at the end, where plan.yaml is.
type scanner struct {
	limits  Limits
	sink    sink
	digests bool // hash each file (Review)
	entries int
	total   int64
	kinds   map[string]kind
	files   []FileInfo

	// top is the first path element of the first entry; single stays true
	// while every entry lies strictly below a directory of that name.
	top    string
	single bool
	// rootPlan and topPlan hold plan.yaml at the root and under top.
	rootPlan, topPlan []byte
	// deepPlan is a plan.yaml found deeper, for a helpful error message.
	deepPlan string
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidArchive}, args...)...)
}

func tooLarge(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrTooLarge}, args...)...)
}

// countEntry enforces MaxFiles on every header the archive carries, even the
// ones that end up ignored, since each costs work.
func (s *scanner) countEntry() error {
	s.entries++
	if s.entries > s.limits.MaxFiles {
		return tooLarge("more than %d entries (the limit)", s.limits.MaxFiles)
	}
	return nil
}

// addDir records an explicit directory entry.
func (s *scanner) addDir(name string) error {
	p, err := entryPath(name)
	if err != nil {
		return err
	}
	if p == "" { // the archive's own root, as in "./"
		return nil
	}
	if err := s.claim(name, p, kindDir); err != nil {
		return err
	}
	return s.sink.mkdir(p)
}

// addFile checks a regular file entry and copies its content, as read, to
// the sink. claimed is the size the header states, or -1 when unknown.
func (s *scanner) addFile(name string, claimed int64, executable bool, r io.Reader) error {
	p, err := entryPath(name)
	if err != nil {
		return err
	}
	if p == "" {
		return invalid("entry %q: a file cannot be the archive's root", name)
	}
	if err := s.claim(name, p, kindFile); err != nil {
		return err
	}
	if claimed > s.limits.MaxFileBytes {
		return tooLarge("entry %q: %s, more than the %s allowed per file", name, formatBytes(claimed), formatBytes(s.limits.MaxFileBytes))
	}
	if claimed > s.limits.MaxUnpackedBytes-s.total {
		return tooLarge("entry %q: %s, which takes the archive past the %s allowed in all", name, formatBytes(claimed), formatBytes(s.limits.MaxUnpackedBytes))
	}

	isPlan := p == PlanFile || p == s.top+"/"+PlanFile
	if !isPlan && path.Base(p) == PlanFile && s.deepPlan == "" {
		s.deepPlan = p
	}
	w, err := s.sink.create(p, executable)
	if err != nil {
		return err
	}
	var plan *bytes.Buffer
	dst := io.Writer(w)
	if isPlan {
		plan = new(bytes.Buffer)
		dst = io.MultiWriter(dst, &capWriter{buf: plan, max: MaxPlanBytes})
	}
	var digest hash.Hash
	if s.digests {
		digest = sha256.New()
		dst = io.MultiWriter(dst, digest)
	}
	n, err := s.copyLimited(name, dst, r)
	if cerr := w.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("writing %s: %w", p, cerr)
	}
	if err != nil {
		return err
	}
	if isPlan {
		if n > MaxPlanBytes {
			return tooLarge("entry %q: %s, more than the %s a plan may have", name, formatBytes(n), formatBytes(MaxPlanBytes))
		}
		if p == PlanFile {
			s.rootPlan = plan.Bytes()
		} else {
			s.topPlan = plan.Bytes()
		}
	}
	info := FileInfo{Path: p, Size: n, Executable: executable}
	if digest != nil {
		info.SHA256 = hex.EncodeToString(digest.Sum(nil))
	}
	s.files = append(s.files, info)
	return nil
}

// copyLimited copies at most one byte more than the limits allow, so a file
// that decompresses to more than its header claims is stopped as soon as it
// crosses a limit, whatever the header said.
func (s *scanner) copyLimited(name string, w io.Writer, r io.Reader) (int64, error) {
	remaining := s.limits.MaxUnpackedBytes - s.total
	limit := min(s.limits.MaxFileBytes, remaining)
	src := &readErrTracker{r: r}
	n, err := io.Copy(w, io.LimitReader(src, limit+1))
	if src.err != nil {
		return n, invalid("entry %q: %s", name, describeReadError(src.err))
	}
	if err != nil {
		return n, fmt.Errorf("writing %s: %w", name, err)
	}
	if n > limit {
		if n > s.limits.MaxFileBytes {
			return n, tooLarge("entry %q: more than the %s allowed per file", name, formatBytes(s.limits.MaxFileBytes))
		}
		return n, tooLarge("entry %q takes the archive past the %s allowed in all", name, formatBytes(s.limits.MaxUnpackedBytes))
	}
	s.total += n
	return n, nil
}

// readErrTracker remembers the archive's read errors so they are not
// mistaken for errors writing the unpacked file.
type readErrTracker struct {
	r   io.Reader
	err error
}

func (t *readErrTracker) Read(b []byte) (int, error) {
	n, err := t.r.Read(b)
	if err != nil && !errors.Is(err, io.EOF) {
		t.err = err
	}
	return n, err
}

// capWriter buffers up to max+1 bytes and drops the rest; the caller
// refuses the entry if more arrived.
type capWriter struct {
	buf *bytes.Buffer
	max int
}

func (c *capWriter) Write(b []byte) (int, error) {
	if room := c.max + 1 - c.buf.Len(); room > 0 {
		c.buf.Write(b[:min(len(b), room)])
	}
	return len(b), nil
}

func describeReadError(err error) string {
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "the data ends early (is the archive truncated?)"
	case errors.Is(err, zip.ErrFormat):
		return "its data does not match its header (corrupt, or a header that lies about its size)"
	case errors.Is(err, zip.ErrChecksum), errors.Is(err, gzip.ErrChecksum):
		return "checksum mismatch (the archive is corrupt)"
	case errors.Is(err, zip.ErrAlgorithm):
		return "unsupported compression method (use deflate or store)"
	case errors.Is(err, tar.ErrHeader):
		return "a corrupt tar header (or an entry before it that lies about its size)"
	case errors.Is(err, gzip.ErrHeader):
		return "data that is not gzip (corrupt, or appended to the archive)"
	}
	return "reading: " + err.Error()
}

// claim records that path p (from entry name) is a file or directory,
// refusing duplicates and paths that use a file as a directory, and tracks
// whether every entry lies under one top-level directory.
func (s *scanner) claim(name, p string, k kind) error {
	switch prev := s.kinds[p]; {
	case prev == kindFile || prev == kindDir:
		return invalid("entry %q: %s appears twice in the archive", name, p)
	case prev == kindImplicitDir && k == kindFile:
		return invalid("entry %q: %s is both a file and a directory", name, p)
	}
	s.kinds[p] = k
	for dir := path.Dir(p); dir != "."; dir = path.Dir(dir) {
		switch s.kinds[dir] {
		case kindFile:
			return invalid("entry %q: %s is a file, so it cannot hold %s", name, dir, p)
		case 0:
			s.kinds[dir] = kindImplicitDir
		}
	}
	first, _, below := strings.Cut(p, "/")
	if s.top == "" {
		s.top = first
	}
	if first != s.top || (!below && k == kindFile) {
		s.single = false
	}
	return nil
}

// manifest decides where the experiment root is and describes it.
func (s *scanner) manifest(format Format) (*Manifest, error) {
	m := &Manifest{Format: format, UnpackedBytes: s.total}
	switch {
	case s.kinds[PlanFile] == kindFile:
		m.Plan = s.rootPlan
	case s.single && s.top != "" && s.kinds[s.top+"/"+PlanFile] == kindFile:
		m.Root = s.top
		m.Plan = s.topPlan
	case s.kinds[PlanFile] != 0:
		return nil, invalid("plan.yaml at the root is a directory, not a file")
	case s.deepPlan != "":
		return nil, invalid("no plan.yaml at the root (found %s): pack the directory that holds plan.yaml", s.deepPlan)
	default:
		return nil, invalid("no plan.yaml at the root: an experiment archive needs one there, or under a single top-level directory")
	}
	if m.Plan == nil {
		m.Plan = []byte{}
	}
	prefix := ""
	if m.Root != "" {
		prefix = m.Root + "/"
	}
	for _, f := range s.files {
		f.Path = strings.TrimPrefix(f.Path, prefix)
		m.Files = append(m.Files, f)
	}
	slices.SortFunc(m.Files, func(a, b FileInfo) int { return strings.Compare(a.Path, b.Path) })
	return m, nil
}

// cleanEntryPath turns an archive entry name into a clean relative
// slash-separated path, or refuses it. It drops "." elements, empty elements
// and a trailing slash; it refuses what could land outside the destination
// on any system: absolute paths, drive letters, "..", backslashes (a
// separator on Windows) and control characters. The empty result names the
// archive's root. Its errors are bare reasons for callers to wrap.
func cleanEntryPath(name string) (string, error) {
	switch {
	case name == "":
		return "", errors.New("the name is empty")
	case len(name) > 4096:
		return "", errors.New("the name is longer than 4096 bytes")
	case !utf8.ValidString(name):
		return "", errors.New("the name is not valid UTF-8")
	case strings.ContainsRune(name, '\\'):
		return "", errors.New("the name contains a backslash: use '/' between path elements")
	case strings.IndexFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f }) >= 0:
		return "", errors.New("the name contains a control character")
	case name[0] == '/':
		return "", errors.New("absolute paths are not allowed: paths must be relative to the experiment root")
	case len(name) >= 2 && name[1] == ':' && ('a' <= name[0]|0x20 && name[0]|0x20 <= 'z'):
		return "", errors.New("a drive letter is not allowed: paths must be relative to the experiment root")
	}
	var parts []string
	for _, part := range strings.Split(name, "/") {
		switch part {
		case "", ".":
			continue
		case "..":
			return "", errors.New(`".." is not allowed: paths must stay inside the experiment root`)
		}
		if len(part) > 255 {
			return "", errors.New("a path element is longer than 255 bytes")
		}
		parts = append(parts, part)
	}
	return strings.Join(parts, "/"), nil
}

// entryPath is cleanEntryPath for an entry read from an archive.
func entryPath(name string) (string, error) {
	p, err := cleanEntryPath(name)
	if err != nil {
		if len(name) > 256 {
			name = name[:256] + "..."
		}
		return "", invalid("entry %q: %v", name, err)
	}
	return p, nil
}

func (s *scanner) scanTarGz(f *os.File) error {
	zr, err := gzip.NewReader(bufio.NewReader(f))
	if err != nil {
		return invalid("not a valid gzip stream: %s", describeReadError(err))
	}
	defer zr.Close()
	tr := tar.NewReader(zr)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil && !errors.Is(err, tar.ErrInsecurePath) {
			// ErrInsecurePath (GODEBUG tarinsecurepath=0) comes with a
			// usable header; cleanEntryPath gives the better message.
			if s.entries == 0 && errors.Is(err, tar.ErrHeader) {
				return invalid("the gzip stream does not hold a tar archive")
			}
			return invalid("reading the tar stream after %d entries: %s", s.entries, describeReadError(err))
		}
		if err := s.countEntry(); err != nil {
			return err
		}
		switch hdr.Typeflag {
		case tar.TypeReg:
			err = s.addFile(hdr.Name, hdr.Size, hdr.Mode&0o100 != 0, tr)
		case tar.TypeDir:
			err = s.addDir(hdr.Name)
		case tar.TypeXGlobalHeader:
			// Metadata for the whole archive (git archive writes one
			// holding the commit id); it names no file.
		default:
			err = invalid("entry %q is a %s: experiment archives hold only regular files and directories", hdr.Name, tarTypeName(hdr.Typeflag))
		}
		if err != nil {
			return err
		}
	}
	// Read what follows the tar stream so gzip verifies its checksum and a
	// truncated or tampered tail is caught.
	n, err := io.Copy(io.Discard, io.LimitReader(zr, maxTrailingBytes+1))
	if err != nil {
		return invalid("after the tar stream: %s", describeReadError(err))
	}
	if n > maxTrailingBytes {
		return invalid("more than %s of data after the end of the tar stream", formatBytes(maxTrailingBytes))
	}
	return nil
}

func tarTypeName(t byte) string {
	switch t {
	case tar.TypeSymlink:
		return "symbolic link"
	case tar.TypeLink:
		return "hard link"
	case tar.TypeChar:
		return "character device"
	case tar.TypeBlock:
		return "block device"
	case tar.TypeFifo:
		return "named pipe (FIFO)"
	case tar.TypeCont:
		return "contiguous file"
	case tar.TypeGNUSparse:
		return "sparse file"
	}
	return fmt.Sprintf("entry of tar type %q", t)
}

func (s *scanner) scanZip(f *os.File, size int64) error {
	zr, err := zip.NewReader(f, size)
	if err != nil && !errors.Is(err, zip.ErrInsecurePath) {
		return invalid("not a valid zip file: %s", describeReadError(err))
	}
	if len(zr.File) > s.limits.MaxFiles {
		return tooLarge("%d entries, more than the %d allowed", len(zr.File), s.limits.MaxFiles)
	}
	for _, zf := range zr.File {
		if err := s.countEntry(); err != nil {
			return err
		}
		if err := s.zipEntry(zf); err != nil {
			return err
		}
	}
	return nil
}

func (s *scanner) zipEntry(zf *zip.File) error {
	mode := zf.Mode()
	switch {
	case mode&fs.ModeSymlink != 0:
		return invalid("entry %q is a symbolic link: experiment archives hold only regular files and directories", zf.Name)
	case mode&(fs.ModeDevice|fs.ModeCharDevice) != 0:
		return invalid("entry %q is a device: experiment archives hold only regular files and directories", zf.Name)
	case mode&fs.ModeNamedPipe != 0:
		return invalid("entry %q is a named pipe (FIFO): experiment archives hold only regular files and directories", zf.Name)
	case mode&fs.ModeSocket != 0:
		return invalid("entry %q is a socket: experiment archives hold only regular files and directories", zf.Name)
	case mode&fs.ModeIrregular != 0:
		return invalid("entry %q is not a regular file: experiment archives hold only regular files and directories", zf.Name)
	case zf.Flags&0x1 != 0:
		return invalid("entry %q is encrypted: encrypted archives are not supported", zf.Name)
	case mode.IsDir():
		if zf.UncompressedSize64 != 0 {
			return invalid("entry %q is a directory that claims to hold %d bytes", zf.Name, zf.UncompressedSize64)
		}
		return s.addDir(zf.Name)
	}
	claimed := int64(zf.UncompressedSize64)
	if zf.UncompressedSize64 > 1<<62 {
		claimed = 1 << 62
	}
	// Check the name before opening, so an unsafe name is reported as such
	// rather than as whatever opening it runs into.
	if _, err := entryPath(zf.Name); err != nil {
		return err
	}
	rc, err := zf.Open()
	if err != nil {
		return invalid("entry %q: %s", zf.Name, describeReadError(err))
	}
	defer rc.Close()
	return s.addFile(zf.Name, claimed, mode&0o100 != 0, rc)
}

// formatBytes writes a byte count for people: "2 GiB", "1.5 MiB", "512 B".
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	v := float64(n) / float64(div)
	s := fmt.Sprintf("%.1f", v)
	s = strings.TrimSuffix(s, ".0")
	return s + " " + string("KMGTPE"[exp]) + "iB"
}

// Pack writes dir as a gzip-compressed tar archive to w (stored rather than
// compressed when model weights make up most of it: see packLevel). Packing the same
// tree twice gives the same bytes: entries come in lexical order with their
// modification times, owners and groups zeroed and their modes reduced to
// 0644 or 0755 (directories, and files with any execute bit). Only regular
// files and directories are packed: a symbolic link, device, pipe or socket
// is an error naming its path, as is a name Inspect would refuse. dir must
// hold plan.yaml. Pack does not apply Limits or parse the plan; the
// receiving side does both.
func Pack(dir string, w io.Writer) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("packing experiment: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("packing experiment: %s is not a directory", dir)
	}
	planPath := filepath.Join(dir, PlanFile)
	pfi, err := os.Lstat(planPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s has no plan.yaml: an experiment directory needs one at its root", dir)
	case err != nil:
		return fmt.Errorf("packing experiment: %w", err)
	case !pfi.Mode().IsRegular():
		return fmt.Errorf("%s is not a regular file: plan.yaml must be a file at the experiment directory's root", planPath)
	}
	// If the archive is being written into the directory being packed, it
	// must not pack itself.
	var self os.FileInfo
	if f, ok := w.(*os.File); ok {
		self, _ = f.Stat()
	}

	level, err := packLevel(dir)
	if err != nil {
		return fmt.Errorf("packing experiment: %w", err)
	}
	zw, err := gzip.NewWriterLevel(w, level)
	if err != nil {
		return fmt.Errorf("packing experiment: %w", err)
	}
	tw := tar.NewWriter(zw)
	walkErr := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("packing experiment: %w", err)
		}
		if p == dir {
			return nil
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return fmt.Errorf("packing experiment: %w", err)
		}
		name := filepath.ToSlash(rel)
		if _, err := cleanEntryPath(name); err != nil {
			return fmt.Errorf("packing experiment: %s: %w: rename it or move it out of %s", p, err, dir)
		}
		switch t := d.Type(); {
		case t&fs.ModeSymlink != 0:
			return fmt.Errorf("packing experiment: %s is a symbolic link: experiment archives hold only regular files and directories (copy what it points to instead)", p)
		case t.IsDir():
			return writeTarHeader(tw, &tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: 0o755})
		case t.IsRegular():
			return packFile(tw, p, name, self)
		default:
			return fmt.Errorf("packing experiment: %s is a %s: experiment archives hold only regular files and directories", p, fileTypeName(t))
		}
	})
	if walkErr != nil {
		return walkErr
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("packing experiment: writing the archive: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("packing experiment: writing the archive: %w", err)
	}
	return nil
}

// packLevel is the gzip level for packing dir: none when most of its bytes
// are model weights (.safetensors), which do not compress (1 GiB of float32
// weights deflate to 993 MB in 50 s, most of a submission's time), and
// deflate's default otherwise. The choice depends only on the directory, so
// packing stays deterministic; sdk/python's packer makes the same one.
func packLevel(dir string) (int, error) {
	var all, weights int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		all += fi.Size()
		if strings.HasSuffix(d.Name(), ".safetensors") {
			weights += fi.Size()
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	if weights > 0 && weights >= all/2 {
		return gzip.NoCompression, nil
	}
	return gzip.DefaultCompression, nil
}

func packFile(tw *tar.Writer, p, name string, self os.FileInfo) error {
	f, err := os.Open(p)
	if err != nil {
		return fmt.Errorf("packing experiment: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("packing experiment: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("packing experiment: %s changed while packing: it is no longer a regular file", p)
	}
	if self != nil && os.SameFile(fi, self) {
		return fmt.Errorf("packing experiment: %s is the archive being written: write it outside the experiment directory", p)
	}
	mode := int64(0o644)
	if fi.Mode().Perm()&0o111 != 0 {
		mode = 0o755
	}
	if err := writeTarHeader(tw, &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: fi.Size()}); err != nil {
		return err
	}
	n, err := io.Copy(tw, f)
	if err != nil {
		if errors.Is(err, tar.ErrWriteTooLong) {
			return fmt.Errorf("packing experiment: %s grew while packing: pack it again once nothing writes to it", p)
		}
		return fmt.Errorf("packing experiment: %s: %w", p, err)
	}
	if n != fi.Size() {
		return fmt.Errorf("packing experiment: %s shrank while packing: pack it again once nothing writes to it", p)
	}
	return nil
}

// writeTarHeader writes a header stripped of everything that varies between
// machines and checkouts.
func writeTarHeader(tw *tar.Writer, h *tar.Header) error {
	h.ModTime = time.Unix(0, 0)
	h.Uid, h.Gid = 0, 0
	h.Uname, h.Gname = "", ""
	if err := tw.WriteHeader(h); err != nil {
		return fmt.Errorf("packing experiment: writing the archive: %w", err)
	}
	return nil
}

func fileTypeName(t fs.FileMode) string {
	switch {
	case t&fs.ModeNamedPipe != 0:
		return "named pipe (FIFO)"
	case t&fs.ModeSocket != 0:
		return "socket"
	case t&fs.ModeCharDevice != 0:
		return "character device"
	case t&fs.ModeDevice != 0:
		return "device"
	}
	return "special file"
}

// HashFile returns a file's size and sha256 (lower-case hex), the two
// numbers that identify an archive on the wire and in allow-lists.
func HashFile(path string) (size int64, sha string, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return 0, "", fmt.Errorf("read %s: %w", path, err)
	}
	return n, hex.EncodeToString(h.Sum(nil)), nil
}
