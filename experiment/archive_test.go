package experiment

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/flate"
	"compress/gzip"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

const validPlan = "name: demo\nrounds: 1\nrunner: {kind: exec, command: [./train.sh]}\n"

// tree is an experiment directory: slash paths to contents. A path ending
// in "/" is an (empty) directory; a path starting with "*" is executable.
type tree map[string]string

func writeTree(t *testing.T, dir string, files tree) {
	t.Helper()
	for name, body := range files {
		mode := os.FileMode(0o644)
		if strings.HasPrefix(name, "*") {
			name, mode = name[1:], 0o755
		}
		p := filepath.Join(dir, filepath.FromSlash(name))
		if strings.HasSuffix(name, "/") {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
}

func randomBytes(n int, seed uint64) string {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return string(b)
}

func sampleTree() tree {
	return tree{
		"plan.yaml":         validPlan,
		"model.safetensors": randomBytes(70_000, 1),
		"*train.sh":         "#!/bin/sh\nexec python3 train.py \"$@\"\n",
		"train.py":          "print('training')\n",
		"src/util.py":       "def f(): pass\n",
		"src/deep/x.txt":    "x",
		"data/empty/":       "",
	}
}

// wantFiles is the manifest a sampleTree-like tree should produce.
func wantFiles(files tree) []FileInfo {
	var out []FileInfo
	for name, body := range files {
		exec := strings.HasPrefix(name, "*")
		name = strings.TrimPrefix(name, "*")
		if strings.HasSuffix(name, "/") {
			continue
		}
		out = append(out, FileInfo{Path: name, Size: int64(len(body)), Executable: exec})
	}
	sortFiles(out)
	return out
}

func sortFiles(fs []FileInfo) {
	for i := range fs {
		for j := i + 1; j < len(fs); j++ {
			if fs[j].Path < fs[i].Path {
				fs[i], fs[j] = fs[j], fs[i]
			}
		}
	}
}

// checkUnpacked compares an unpacked directory with the tree it came from,
// modes included.
func checkUnpacked(t *testing.T, dest string, files tree) {
	t.Helper()
	fi, err := os.Stat(dest)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o700 {
		t.Errorf("dest mode %o, want 700", got)
	}
	want := map[string]bool{}
	for name, body := range files {
		exec := strings.HasPrefix(name, "*")
		name = strings.TrimPrefix(name, "*")
		p := filepath.Join(dest, filepath.FromSlash(name))
		want[strings.TrimSuffix(name, "/")] = true
		fi, err := os.Lstat(p)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if strings.HasSuffix(name, "/") {
			if !fi.IsDir() || fi.Mode().Perm() != 0o700 {
				t.Errorf("%s: mode %v, want a 0700 directory", name, fi.Mode())
			}
			continue
		}
		wantMode := os.FileMode(0o600)
		if exec {
			wantMode = 0o700
		}
		if !fi.Mode().IsRegular() || fi.Mode().Perm() != wantMode {
			t.Errorf("%s: mode %v, want a %o file", name, fi.Mode(), wantMode)
		}
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != body {
			t.Errorf("%s: content differs (%d bytes, want %d)", name, len(got), len(body))
		}
	}
	// Nothing else, and every directory 0700.
	err = filepath.WalkDir(dest, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dest {
			return err
		}
		rel, _ := filepath.Rel(dest, p)
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			if info, _ := d.Info(); info.Mode().Perm() != 0o700 {
				t.Errorf("%s: directory mode %o, want 700", rel, info.Mode().Perm())
			}
			return nil
		}
		if !want[rel] {
			t.Errorf("unexpected file %s", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func packToFile(t *testing.T, dir string) string {
	t.Helper()
	var buf bytes.Buffer
	if err := Pack(dir, &buf); err != nil {
		t.Fatal(err)
	}
	return writeFile(t, buf.Bytes())
}

func writeFile(t *testing.T, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "archive.bin")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// zipTree writes files as a zip, under prefix.
func zipTree(t *testing.T, files tree, prefix string) []byte {
	t.Helper()
	var entries []zipEntry
	for name, body := range files {
		mode := fs.FileMode(0o644)
		if strings.HasPrefix(name, "*") {
			name, mode = name[1:], 0o755
		}
		if strings.HasSuffix(name, "/") {
			mode = fs.ModeDir | 0o755
		}
		entries = append(entries, zipEntry{name: prefix + name, body: body, mode: mode})
	}
	return zipBytes(t, entries...)
}

type zipEntry struct {
	name   string
	body   string
	mode   fs.FileMode
	method uint16
	flags  uint16
}

func zipBytes(t *testing.T, entries ...zipEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range entries {
		h := &zip.FileHeader{Name: e.name, Method: zip.Deflate, Flags: e.flags}
		if e.method != 0 {
			h.Method = e.method
		}
		if e.mode != 0 {
			h.SetMode(e.mode)
		}
		if e.method == 0 && e.flags == 0 {
			w, err := zw.CreateHeader(h)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
			continue
		}
		// Unusual methods and flags: write the body raw, as stored.
		h.CompressedSize64 = uint64(len(e.body))
		h.UncompressedSize64 = uint64(len(e.body))
		h.CRC32 = crc32.ChecksumIEEE([]byte(e.body))
		w, err := zw.CreateRaw(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// lyingZip holds plan.yaml and one deflated file whose headers claim
// claimedSize while its data inflates to actual bytes.
func lyingZip(t *testing.T, claimedSize uint64, actual int) []byte {
	t.Helper()
	body := bytes.Repeat([]byte("A"), actual)
	var deflated bytes.Buffer
	fw, err := flate.NewWriter(&deflated, flate.BestCompression)
	if err != nil {
		t.Fatal(err)
	}
	fw.Write(body)
	fw.Close()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	w, err := zw.Create("plan.yaml")
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(validPlan))
	h := &zip.FileHeader{
		Name:               "bomb.bin",
		Method:             zip.Deflate,
		CRC32:              crc32.ChecksumIEEE(body),
		CompressedSize64:   uint64(deflated.Len()),
		UncompressedSize64: claimedSize,
	}
	rw, err := zw.CreateRaw(h)
	if err != nil {
		t.Fatal(err)
	}
	rw.Write(deflated.Bytes())
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type tarEntry struct {
	name     string
	typ      byte
	body     string
	mode     int64
	linkname string
}

func file(name, body string) tarEntry { return tarEntry{name: name, typ: tar.TypeReg, body: body} }
func dir(name string) tarEntry        { return tarEntry{name: name, typ: tar.TypeDir} }

func tarBytes(t *testing.T, entries ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: mode, Linkname: e.linkname, ModTime: time.Unix(0, 0)}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if e.typ == tar.TypeXGlobalHeader {
			h = &tar.Header{Name: e.name, Typeflag: e.typ, PAXRecords: map[string]string{"comment": "3f1c0ffee"}}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gz(t *testing.T, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func tarGz(t *testing.T, entries ...tarEntry) []byte { return gz(t, tarBytes(t, entries...)) }

// lyingTar holds plan.yaml and a file whose header claims fewer bytes than
// follow it.
func lyingTar(t *testing.T) []byte {
	t.Helper()
	raw := tarBytes(t, file("plan.yaml", validPlan), file("liar.bin", strings.Repeat("B", 2000)))
	// The second header starts after the first header and its padded data.
	off := 512 + (len(validPlan)+511)/512*512
	h := raw[off : off+512]
	copy(h[124:136], fmt.Sprintf("%011o\x00", 10))
	copy(h[148:156], "        ")
	var sum int64
	for _, b := range h {
		sum += int64(b)
	}
	copy(h[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return gz(t, raw)
}

func TestPackInspectUnpackRoundTrip(t *testing.T) {
	files := sampleTree()
	src := t.TempDir()
	writeTree(t, src, files)
	packed := packToFile(t, src)

	cases := []struct {
		name   string
		path   string
		format Format
		root   string
	}{
		{"tar.gz from Pack", packed, FormatTarGz, ""},
		{"zip", writeFile(t, zipTree(t, files, "")), FormatZip, ""},
		{"zip under one top-level directory", writeFile(t, zipTree(t, files, "my-exp/")), FormatZip, "my-exp"},
		{"tar.gz under one top-level directory", writeFile(t, tarGz(t,
			dir("my-exp/"), file("my-exp/plan.yaml", validPlan), file("my-exp/model.safetensors", files["model.safetensors"]),
			tarEntry{name: "my-exp/train.sh", typ: tar.TypeReg, body: files["*train.sh"], mode: 0o755},
			file("my-exp/train.py", files["train.py"]), file("my-exp/src/util.py", files["src/util.py"]),
			file("my-exp/src/deep/x.txt", "x"), dir("my-exp/data/empty/"))), FormatTarGz, "my-exp"},
		{"tar.gz as tar czf . makes it", writeFile(t, tarGz(t,
			dir("./"), file("./plan.yaml", validPlan), file("./model.safetensors", files["model.safetensors"]),
			tarEntry{name: "./train.sh", typ: tar.TypeReg, body: files["*train.sh"], mode: 0o755},
			file("./train.py", files["train.py"]), dir("./src/"), file("./src/util.py", files["src/util.py"]),
			file("./src/deep/x.txt", "x"), dir("./data/"), dir("./data/empty/"))), FormatTarGz, ""},
		{"tar.gz as git archive makes it", writeFile(t, tarGz(t,
			tarEntry{name: "pax_global_header", typ: tar.TypeXGlobalHeader},
			file("plan.yaml", validPlan), file("model.safetensors", files["model.safetensors"]),
			tarEntry{name: "train.sh", typ: tar.TypeReg, body: files["*train.sh"], mode: 0o775},
			file("train.py", files["train.py"]), file("src/util.py", files["src/util.py"]),
			file("src/deep/x.txt", "x"), dir("data/empty/"))), FormatTarGz, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m, err := Inspect(c.path, Limits{})
			if err != nil {
				t.Fatal(err)
			}
			if m.Format != c.format || m.Root != c.root {
				t.Errorf("format %q root %q, want %q %q", m.Format, m.Root, c.format, c.root)
			}
			if want := wantFiles(files); !reflect.DeepEqual(m.Files, want) {
				t.Errorf("files\n got %+v\nwant %+v", m.Files, want)
			}
			var total int64
			for _, f := range m.Files {
				total += f.Size
			}
			if m.UnpackedBytes != total {
				t.Errorf("UnpackedBytes %d, want %d", m.UnpackedBytes, total)
			}
			if string(m.Plan) != validPlan {
				t.Errorf("plan %q", m.Plan)
			}
			if _, err := ParsePlan(m.Plan); err != nil {
				t.Errorf("plan from archive: %v", err)
			}

			parent := t.TempDir()
			dest := filepath.Join(parent, "unpacked")
			um, err := Unpack(c.path, dest, Limits{})
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(um, m) {
				t.Errorf("Unpack manifest differs from Inspect's:\n%+v\n%+v", um, m)
			}
			checkUnpacked(t, dest, files)
			entries, _ := os.ReadDir(parent)
			if len(entries) != 1 {
				t.Errorf("Unpack left %d entries beside dest, want only dest", len(entries))
			}
		})
	}
}

func TestInspectWritesNothing(t *testing.T) {
	src := t.TempDir()
	writeTree(t, src, sampleTree())
	p := packToFile(t, src)
	before, _ := os.ReadDir(filepath.Dir(p))
	if _, err := Inspect(p, Limits{}); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadDir(filepath.Dir(p))
	if len(before) != len(after) {
		t.Fatalf("Inspect changed the archive's directory: %v -> %v", before, after)
	}
}

func TestPackIsDeterministic(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	writeTree(t, a, sampleTree())
	writeTree(t, b, sampleTree())
	old := time.Date(2001, 2, 3, 4, 5, 6, 7, time.UTC)
	filepath.WalkDir(b, func(p string, d fs.DirEntry, err error) error {
		return os.Chtimes(p, old, old)
	})
	var x, y, z bytes.Buffer
	for _, c := range []struct {
		dir string
		buf *bytes.Buffer
	}{{a, &x}, {b, &y}, {a, &z}} {
		if err := Pack(c.dir, c.buf); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(x.Bytes(), z.Bytes()) {
		t.Error("packing the same directory twice gave different bytes")
	}
	if !bytes.Equal(x.Bytes(), y.Bytes()) {
		t.Error("packing equal trees with different mtimes gave different bytes")
	}
	// Entries are in order, with times and owners zeroed.
	zr, err := gzip.NewReader(bytes.NewReader(x.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var names []string
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		names = append(names, h.Name)
		if !h.ModTime.Equal(time.Unix(0, 0)) || h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" {
			t.Errorf("%s: header carries machine details: %+v", h.Name, h)
		}
		if h.Name == "train.sh" && h.Mode != 0o755 || h.Name == "train.py" && h.Mode != 0o644 {
			t.Errorf("%s: mode %o", h.Name, h.Mode)
		}
	}
	want := []string{"data/", "data/empty/", "model.safetensors", "plan.yaml", "src/", "src/deep/", "src/deep/x.txt", "src/util.py", "train.py", "train.sh"}
	if !reflect.DeepEqual(names, want) {
		t.Errorf("entries %v, want %v", names, want)
	}
}

func TestPackRefuses(t *testing.T) {
	cases := []struct {
		name  string
		setup func(t *testing.T, dir string)
		msg   string
	}{
		{"no plan.yaml", func(t *testing.T, dir string) {
			writeTree(t, dir, tree{"train.py": "x"})
		}, "has no plan.yaml: an experiment directory needs one at its root"},
		{"plan.yaml is a directory", func(t *testing.T, dir string) {
			writeTree(t, dir, tree{"plan.yaml/": ""})
		}, "plan.yaml must be a file"},
		{"plan.yaml is a symlink", func(t *testing.T, dir string) {
			writeTree(t, dir, tree{"real.yaml": validPlan})
			os.Symlink("real.yaml", filepath.Join(dir, "plan.yaml"))
		}, "plan.yaml must be a file"},
		{"symlink", func(t *testing.T, dir string) {
			writeTree(t, dir, tree{"plan.yaml": validPlan, "src/a.py": ""})
			os.Symlink("/etc/passwd", filepath.Join(dir, "src", "passwd"))
		}, filepath.Join("src", "passwd") + " is a symbolic link"},
		{"symlinked directory", func(t *testing.T, dir string) {
			writeTree(t, dir, tree{"plan.yaml": validPlan})
			os.Symlink(t.TempDir(), filepath.Join(dir, "data"))
		}, "data is a symbolic link"},
		{"backslash in a name", func(t *testing.T, dir string) {
			writeTree(t, dir, tree{"plan.yaml": validPlan, `a\b.py`: ""})
		}, `a\b.py: the name contains a backslash`},
		{"not a directory", func(t *testing.T, dir string) {
			writeTree(t, dir, tree{"plan.yaml": validPlan})
		}, "is not a directory"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			c.setup(t, dir)
			target := dir
			if c.name == "not a directory" {
				target = filepath.Join(dir, "plan.yaml")
			}
			var buf bytes.Buffer
			err := Pack(target, &buf)
			if err == nil || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want an error containing %q", err, c.msg)
			}
		})
	}
}

func TestPackRefusesToPackItself(t *testing.T) {
	dir := t.TempDir()
	writeTree(t, dir, tree{"plan.yaml": validPlan})
	f, err := os.Create(filepath.Join(dir, "self.tar.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = Pack(dir, f)
	if err == nil || !strings.Contains(err.Error(), "is the archive being written") {
		t.Fatalf("got %v", err)
	}
}

func TestHostileArchives(t *testing.T) {
	okPlan := file("plan.yaml", validPlan)
	small := Limits{MaxFiles: 4, MaxUnpackedBytes: 1000, MaxFileBytes: 600}
	cases := []struct {
		name   string
		data   func(t *testing.T) []byte
		limits Limits
		class  error
		msg    string
	}{
		// Paths.
		{"tar zip-slip", func(t *testing.T) []byte { return tarGz(t, okPlan, file("../evil", "x")) }, Limits{}, ErrInvalidArchive, `entry "../evil": ".." is not allowed`},
		{"tar zip-slip inside a path", func(t *testing.T) []byte { return tarGz(t, okPlan, file("a/../../evil", "x")) }, Limits{}, ErrInvalidArchive, `".." is not allowed`},
		{"tar harmless-looking dot-dot", func(t *testing.T) []byte { return tarGz(t, okPlan, file("a/../b", "x")) }, Limits{}, ErrInvalidArchive, `".." is not allowed`},
		{"tar absolute path", func(t *testing.T) []byte { return tarGz(t, okPlan, file("/etc/cron.d/evil", "x")) }, Limits{}, ErrInvalidArchive, "absolute paths are not allowed"},
		{"tar backslash", func(t *testing.T) []byte { return tarGz(t, okPlan, file(`..\evil`, "x")) }, Limits{}, ErrInvalidArchive, "backslash"},
		{"tar drive letter", func(t *testing.T) []byte { return tarGz(t, okPlan, file("C:/evil", "x")) }, Limits{}, ErrInvalidArchive, "drive letter"},
		{"tar control character", func(t *testing.T) []byte { return tarGz(t, okPlan, file("a\nb", "x")) }, Limits{}, ErrInvalidArchive, "control character"},
		{"zip zip-slip", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "../../evil", body: "x"})
		}, Limits{}, ErrInvalidArchive, `entry "../../evil": ".." is not allowed`},
		{"zip absolute path", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "/tmp/evil", body: "x"})
		}, Limits{}, ErrInvalidArchive, "absolute paths"},
		{"zip backslash", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: `..\..\evil`, body: "x"})
		}, Limits{}, ErrInvalidArchive, "backslash"},

		// Entry types.
		{"tar symlink", func(t *testing.T) []byte {
			return tarGz(t, okPlan, tarEntry{name: "passwd", typ: tar.TypeSymlink, linkname: "/etc/passwd"})
		}, Limits{}, ErrInvalidArchive, `entry "passwd" is a symbolic link`},
		{"tar symlink then write through it", func(t *testing.T) []byte {
			return tarGz(t, okPlan, tarEntry{name: "d", typ: tar.TypeSymlink, linkname: "/tmp"}, file("d/evil", "x"))
		}, Limits{}, ErrInvalidArchive, "symbolic link"},
		{"tar hard link", func(t *testing.T) []byte {
			return tarGz(t, okPlan, tarEntry{name: "h", typ: tar.TypeLink, linkname: "/etc/shadow"})
		}, Limits{}, ErrInvalidArchive, `entry "h" is a hard link`},
		{"tar character device", func(t *testing.T) []byte {
			return tarGz(t, okPlan, tarEntry{name: "null", typ: tar.TypeChar})
		}, Limits{}, ErrInvalidArchive, "character device"},
		{"tar block device", func(t *testing.T) []byte {
			return tarGz(t, okPlan, tarEntry{name: "sda", typ: tar.TypeBlock})
		}, Limits{}, ErrInvalidArchive, "block device"},
		{"tar fifo", func(t *testing.T) []byte { return tarGz(t, okPlan, tarEntry{name: "p", typ: tar.TypeFifo}) }, Limits{}, ErrInvalidArchive, "named pipe"},
		{"zip symlink", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "link", body: "/etc/passwd", mode: fs.ModeSymlink | 0o777})
		}, Limits{}, ErrInvalidArchive, `entry "link" is a symbolic link`},
		{"zip device", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "dev", mode: fs.ModeDevice | fs.ModeCharDevice | 0o666})
		}, Limits{}, ErrInvalidArchive, "is a device"},
		{"zip fifo", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "p", mode: fs.ModeNamedPipe | 0o666})
		}, Limits{}, ErrInvalidArchive, "named pipe"},
		{"zip encrypted", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "secret", body: "xxxx", flags: 0x1})
		}, Limits{}, ErrInvalidArchive, "encrypted"},
		{"zip unknown compression", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "odd", body: "xxxx", method: 99})
		}, Limits{}, ErrInvalidArchive, "unsupported compression method"},

		// Duplicates and conflicts.
		{"tar duplicate path", func(t *testing.T) []byte { return tarGz(t, okPlan, file("a.py", "1"), file("a.py", "2")) }, Limits{}, ErrInvalidArchive, "a.py appears twice"},
		{"tar duplicate plan", func(t *testing.T) []byte { return tarGz(t, okPlan, file("./plan.yaml", "name: other")) }, Limits{}, ErrInvalidArchive, "plan.yaml appears twice"},
		{"tar duplicate by spelling", func(t *testing.T) []byte { return tarGz(t, okPlan, file("a/b", "1"), file("a//./b", "2")) }, Limits{}, ErrInvalidArchive, "a/b appears twice"},
		{"tar file then directory", func(t *testing.T) []byte { return tarGz(t, okPlan, file("a", "1"), file("a/b", "2")) }, Limits{}, ErrInvalidArchive, "a is a file, so it cannot hold a/b"},
		{"tar directory then file", func(t *testing.T) []byte { return tarGz(t, okPlan, file("a/b", "1"), file("a", "2")) }, Limits{}, ErrInvalidArchive, "a is both a file and a directory"},
		{"tar directory twice", func(t *testing.T) []byte { return tarGz(t, okPlan, dir("d/"), dir("d/")) }, Limits{}, ErrInvalidArchive, "appears twice"},
		{"zip duplicate path", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "plan.yaml", body: "name: evil"})
		}, Limits{}, ErrInvalidArchive, "plan.yaml appears twice"},

		// Sizes that lie.
		{"tar header smaller than its data", lyingTar, Limits{}, ErrInvalidArchive, "a corrupt tar header (or an entry before it that lies about its size)"},
		{"zip header smaller than its data", func(t *testing.T) []byte { return lyingZip(t, 100, 50_000) }, Limits{}, ErrInvalidArchive, "does not match its header"},
		{"zip bomb with a lying header", func(t *testing.T) []byte { return lyingZip(t, 100, 10<<20) }, Limits{MaxFileBytes: 1 << 20}, ErrInvalidArchive, `entry "bomb.bin"`},
		{"zip header larger than its data", func(t *testing.T) []byte { return lyingZip(t, 60_000, 50_000) }, Limits{}, ErrInvalidArchive, "ends early"},
		{"zip header claims too much", func(t *testing.T) []byte { return lyingZip(t, 1<<40, 10) }, Limits{}, ErrTooLarge, "more than the 2 GiB allowed per file"},

		// Limits.
		{"too many files", func(t *testing.T) []byte {
			return tarGz(t, okPlan, file("1", ""), file("2", ""), file("3", ""), file("4", ""))
		}, small, ErrTooLarge, "more than 4 entries"},
		{"too many directories", func(t *testing.T) []byte { return tarGz(t, okPlan, dir("1/"), dir("2/"), dir("3/"), dir("4/")) }, small, ErrTooLarge, "more than 4 entries"},
		{"too many zip entries", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "1"}, zipEntry{name: "2"}, zipEntry{name: "3"}, zipEntry{name: "4"})
		}, small, ErrTooLarge, "5 entries, more than the 4 allowed"},
		{"file too large", func(t *testing.T) []byte { return tarGz(t, okPlan, file("big", strings.Repeat("x", 601))) }, small, ErrTooLarge, "601 B, more than the 600 B allowed per file"},
		{"zip file too large", func(t *testing.T) []byte {
			return zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan}, zipEntry{name: "big", body: strings.Repeat("x", 601)})
		}, small, ErrTooLarge, "allowed per file"},
		{"total too large", func(t *testing.T) []byte {
			return tarGz(t, okPlan, file("a", strings.Repeat("x", 500)), file("b", strings.Repeat("x", 500)))
		}, small, ErrTooLarge, "past the 1000 B allowed in all"},
		{"plan too large", func(t *testing.T) []byte {
			return tarGz(t, file("plan.yaml", "# "+strings.Repeat("x", MaxPlanBytes)))
		}, Limits{}, ErrTooLarge, "a plan may have"},

		// plan.yaml.
		{"no plan.yaml", func(t *testing.T) []byte { return tarGz(t, file("train.py", "x")) }, Limits{}, ErrInvalidArchive, "no plan.yaml at the root"},
		{"plan.yaml too deep", func(t *testing.T) []byte { return tarGz(t, file("a/b/plan.yaml", validPlan)) }, Limits{}, ErrInvalidArchive, "(found a/b/plan.yaml)"},
		{"two top-level directories", func(t *testing.T) []byte {
			return tarGz(t, file("a/plan.yaml", validPlan), file("b/plan.yaml", validPlan))
		}, Limits{}, ErrInvalidArchive, "no plan.yaml at the root"},
		{"top-level directory and a root file", func(t *testing.T) []byte {
			return tarGz(t, file("a/plan.yaml", validPlan), file("README", "x"))
		}, Limits{}, ErrInvalidArchive, "no plan.yaml at the root"},
		{"plan.yaml is a directory", func(t *testing.T) []byte { return tarGz(t, dir("plan.yaml/"), file("x", "")) }, Limits{}, ErrInvalidArchive, "is a directory"},
		{"empty zip", func(t *testing.T) []byte { return zipBytes(t) }, Limits{}, ErrInvalidArchive, "no plan.yaml"},

		// Not archives, or broken ones.
		{"not an archive", func(t *testing.T) []byte { return []byte(validPlan) }, Limits{}, ErrInvalidArchive, "not a zip or tar.gz file"},
		{"empty file", func(t *testing.T) []byte { return nil }, Limits{}, ErrInvalidArchive, "the file is empty"},
		{"plain tar", func(t *testing.T) []byte { return tarBytes(t, okPlan) }, Limits{}, ErrInvalidArchive, "uncompressed tar"},
		{"gzip of something else", func(t *testing.T) []byte { return gz(t, []byte(strings.Repeat(validPlan, 20))) }, Limits{}, ErrInvalidArchive, "does not hold a tar archive"},
		{"truncated gzip", func(t *testing.T) []byte {
			b := tarGz(t, okPlan, file("model", randomBytes(20_000, 2)))
			return b[:len(b)/2]
		}, Limits{}, ErrInvalidArchive, "truncated"},
		{"gzip missing its trailer", func(t *testing.T) []byte {
			b := tarGz(t, okPlan, file("model", randomBytes(20_000, 3)))
			return b[:len(b)-4]
		}, Limits{}, ErrInvalidArchive, "truncated"},
		{"gzip with a bad checksum", func(t *testing.T) []byte {
			b := tarGz(t, okPlan, file("model", randomBytes(20_000, 4)))
			b[len(b)-6] ^= 0xff
			return b
		}, Limits{}, ErrInvalidArchive, "checksum"},
		{"gzip with garbage after it", func(t *testing.T) []byte { return append(tarGz(t, okPlan), "#!/bin/sh\nrm -rf ~\n"...) }, Limits{}, ErrInvalidArchive, "after the tar stream: data that is not gzip"},
		{"gzip with more tar after the end", func(t *testing.T) []byte {
			return gz(t, append(tarBytes(t, okPlan), bytes.Repeat([]byte{1}, maxTrailingBytes+1)...))
		}, Limits{}, ErrInvalidArchive, "after the end of the tar stream"},
		{"truncated zip", func(t *testing.T) []byte {
			b := zipBytes(t, zipEntry{name: "plan.yaml", body: validPlan})
			return b[:len(b)-10]
		}, Limits{}, ErrInvalidArchive, "not a valid zip file"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			archive := writeFile(t, c.data(t))
			check := func(op string, err error) {
				t.Helper()
				if err == nil {
					t.Fatalf("%s accepted the archive", op)
				}
				if !errors.Is(err, c.class) {
					t.Errorf("%s: error %q is not %v", op, err, c.class)
				}
				other := ErrTooLarge
				if c.class == ErrTooLarge {
					other = ErrInvalidArchive
				}
				if errors.Is(err, other) {
					t.Errorf("%s: error %q matches both classes", op, err)
				}
				if !strings.Contains(err.Error(), c.msg) {
					t.Errorf("%s: error %q does not contain %q", op, err, c.msg)
				}
			}
			m, err := Inspect(archive, c.limits)
			if m != nil {
				t.Error("Inspect returned a manifest with an error")
			}
			check("Inspect", err)

			parent := t.TempDir()
			dest := filepath.Join(parent, "dest")
			m, err = Unpack(archive, dest, c.limits)
			if m != nil {
				t.Error("Unpack returned a manifest with an error")
			}
			check("Unpack", err)
			assertNothingLeft(t, parent)
		})
	}
}

// assertNothingLeft checks that a failed Unpack left its destination's
// parent as empty as it found it: no dest, no temporary directory.
func assertNothingLeft(t *testing.T, parent string) {
	t.Helper()
	entries, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		t.Errorf("left behind: %s", e.Name())
	}
}

func TestCopyLimitedCountsActualBytes(t *testing.T) {
	// The header claims 10 bytes; 5000 arrive. The limit must stop it on
	// the bytes, not trust the claim.
	s := &scanner{limits: Limits{MaxFiles: 10, MaxUnpackedBytes: 1 << 20, MaxFileBytes: 1000}, sink: discardSink{}, kinds: map[string]kind{}, single: true}
	s.entries = 1
	src := &countingReader{r: bytes.NewReader(bytes.Repeat([]byte("x"), 5000))}
	err := s.addFile("liar", 10, false, src)
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("got %v, want ErrTooLarge", err)
	}
	if src.n > 1000+32*1024 {
		t.Errorf("read %d bytes before stopping; want about the limit", src.n)
	}

	s = &scanner{limits: Limits{MaxFiles: 10, MaxUnpackedBytes: 1500, MaxFileBytes: 1000}, sink: discardSink{}, kinds: map[string]kind{}, single: true}
	if err := s.addFile("a", 10, false, bytes.NewReader(make([]byte, 900))); err != nil {
		t.Fatal(err)
	}
	err = s.addFile("b", 10, false, bytes.NewReader(make([]byte, 900)))
	if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "allowed in all") {
		t.Fatalf("got %v, want the total limit", err)
	}
}

type countingReader struct {
	r *bytes.Reader
	n int
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += n
	return n, err
}

func TestUnpackDestination(t *testing.T) {
	src := t.TempDir()
	writeTree(t, src, tree{"plan.yaml": validPlan, "a.txt": "a"})
	archive := packToFile(t, src)

	t.Run("empty existing directory", func(t *testing.T) {
		dest := filepath.Join(t.TempDir(), "dest")
		if err := os.Mkdir(dest, 0o755); err != nil {
			t.Fatal(err)
		}
		if _, err := Unpack(archive, dest, Limits{}); err != nil {
			t.Fatal(err)
		}
		checkUnpacked(t, dest, tree{"plan.yaml": validPlan, "a.txt": "a"})
	})
	refusals := []struct {
		name  string
		setup func(t *testing.T, dest string)
		msg   string
	}{
		{"not empty", func(t *testing.T, dest string) { writeTree(t, dest, tree{"keep.txt": "mine"}) }, "it is not empty"},
		{"a file", func(t *testing.T, dest string) { os.WriteFile(dest, []byte("mine"), 0o600) }, "is not a directory"},
		{"a symlink", func(t *testing.T, dest string) { os.Symlink(t.TempDir(), dest) }, "symbolic link"},
		{"no parent", func(t *testing.T, dest string) {}, "parent directory"},
	}
	for _, c := range refusals {
		t.Run(c.name, func(t *testing.T) {
			parent := t.TempDir()
			dest := filepath.Join(parent, "dest")
			if c.name == "no parent" {
				dest = filepath.Join(parent, "missing", "dest")
			}
			c.setup(t, dest)
			before := snapshot(t, parent)
			_, err := Unpack(archive, dest, Limits{})
			if err == nil || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want an error containing %q", err, c.msg)
			}
			if errors.Is(err, ErrInvalidArchive) || errors.Is(err, ErrTooLarge) {
				t.Errorf("a bad destination is not the archive's fault: %v", err)
			}
			if after := snapshot(t, parent); !reflect.DeepEqual(before, after) {
				t.Errorf("Unpack changed %s:\nbefore %v\nafter  %v", parent, before, after)
			}
		})
	}
	t.Run("missing archive", func(t *testing.T) {
		parent := t.TempDir()
		_, err := Unpack(filepath.Join(parent, "nope.tar.gz"), filepath.Join(parent, "dest"), Limits{})
		if !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("got %v, want fs.ErrNotExist", err)
		}
		assertNothingLeft(t, parent)
	})
}

// snapshot lists every path under dir with its type and content.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, _ := d.Info()
		v := info.Mode().String()
		if info.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			v += " " + string(b)
		}
		out[p] = v
		return nil
	})
	return out
}

func TestLimitsDefaults(t *testing.T) {
	got := Limits{MaxFiles: -1}.withDefaults()
	if got != DefaultLimits() {
		t.Fatalf("got %+v", got)
	}
	if d := DefaultLimits(); d.MaxFiles != 10_000 || d.MaxUnpackedBytes != 4<<30 || d.MaxFileBytes != 2<<30 {
		t.Fatalf("defaults changed: %+v", d)
	}
	custom := Limits{MaxFiles: 3, MaxUnpackedBytes: 7, MaxFileBytes: 5}
	if custom.withDefaults() != custom {
		t.Fatal("set limits were overridden")
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1000: "1000 B", 1024: "1 KiB", 1536: "1.5 KiB", 1 << 20: "1 MiB", 2 << 30: "2 GiB", 4 << 30: "4 GiB"} {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestCleanEntryPath(t *testing.T) {
	for in, want := range map[string]string{
		"a":       "a",
		"./a":     "a",
		"a/":      "a",
		"./":      "",
		".":       "",
		"a//b/./": "a/b",
		"a.b/..c": "a.b/..c",
		"...":     "...",
	} {
		got, err := cleanEntryPath(in)
		if err != nil || got != want {
			t.Errorf("cleanEntryPath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "..", "a/..", "/a", `a\b`, "c:x", "a\x00", "\xff", strings.Repeat("a", 256), strings.Repeat("a/", 2049)} {
		if got, err := cleanEntryPath(in); err == nil {
			t.Errorf("cleanEntryPath(%q) = %q, want an error", in, got)
		}
	}
}

func TestInspectAcceptsMultiMemberGzip(t *testing.T) {
	raw := tarBytes(t, file("plan.yaml", validPlan), file("model", randomBytes(5000, 5)))
	half := len(raw) / 2
	data := append(gz(t, raw[:half]), gz(t, raw[half:])...)
	m, err := Inspect(writeFile(t, data), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Files) != 2 || m.Files[0].Path != "model" || m.Files[0].Size != 5000 {
		t.Fatalf("files %+v", m.Files)
	}
}

func TestPackLongPaths(t *testing.T) {
	long := strings.Repeat("directory-name/", 12) + strings.Repeat("f", 120) + ".py"
	files := tree{"plan.yaml": validPlan, long: "print(1)\n"}
	src := t.TempDir()
	writeTree(t, src, files)
	archive := packToFile(t, src)
	dest := filepath.Join(t.TempDir(), "dest")
	m, err := Unpack(archive, dest, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(m.Files, wantFiles(files)) {
		t.Fatalf("files %+v", m.Files)
	}
	checkUnpacked(t, dest, files)
}

// TestPackStoresModelWeights: a directory that is mostly model weights is
// packed without compression (weights do not compress; deflating them was
// most of a large submission's time), any other compressed as before.
func TestPackStoresModelWeights(t *testing.T) {
	pack := func(files map[string][]byte) int {
		t.Helper()
		dir := t.TempDir()
		files["plan.yaml"] = []byte("name: x\n")
		for name, b := range files {
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		var buf bytes.Buffer
		if err := Pack(dir, &buf); err != nil {
			t.Fatal(err)
		}
		if _, err := Inspect(writeFile(t, buf.Bytes()), DefaultLimits()); err != nil {
			t.Fatalf("the archive does not inspect: %v", err)
		}
		return buf.Len()
	}
	zeros := make([]byte, 1<<20) // compressible, to tell the two apart
	if n := pack(map[string][]byte{"model.safetensors": zeros, "train.py": []byte("print(1)\n")}); n < 1<<20 {
		t.Errorf("an archive of mostly weights is %d bytes for 1 MiB of them: it was compressed", n)
	}
	if n := pack(map[string][]byte{"data.bin": zeros, "model.safetensors": []byte("tiny")}); n > 64<<10 {
		t.Errorf("an archive of mostly other files is %d bytes for 1 MiB of zeros: it was not compressed", n)
	}
}
