"""Packing an experiment directory into the archive the director accepts."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional, Union

from .errors import FXError

PLAN_FILE = "plan.yaml"
CHUNK_SIZE = 1024 * 1024  # the protocol's largest chunk


@dataclass
class Archive:
    """A packed experiment: the file holding it, its size, sha256 and plan."""

    file: BinaryIO
    size: int
    sha256: str
    plan_yaml: str

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        self.file.seek(0)
        while True:
            b = self.file.read(size)
            if not b:
                return
            yield b

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    def close(self) -> None:
        self.file.close()


def _check_name(rel: str, full: str, root: str) -> None:
    """Refuses names the director would refuse, naming the file."""
    problem = None
    if "\\" in rel:
        problem = "contains a backslash"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in rel):
        problem = "contains a control character"
    elif any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in rel.split("/")):
        problem = "has a path element longer than 255 bytes"
    else:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    if problem:
        raise FXError(f"cannot pack {full}: its name {problem}: rename it or move it out of {root}")


def _plan_text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FXError(f"{where} is not UTF-8 text") from None


def pack(directory: Union[str, os.PathLike], out: Optional[BinaryIO] = None) -> Archive:
    """Packs directory into a deterministic tar.gz and returns the Archive.

    The directory must hold plan.yaml at its root. Entries come in sorted
    order with zeroed times, owners and groups, and modes 0644/0755, so the
    same tree always gives the same bytes (and digest). Symbolic links and
    special files are refused with an error naming them. The archive goes to
    ``out`` or to a temporary file (spilled to disk beyond 16 MiB).
    """
    root = os.fspath(directory)
    if not os.path.exists(root):
        raise FXError(f"{root} does not exist: give the experiment directory (the one holding plan.yaml)")
    if not os.path.isdir(root):
        raise FXError(f"{root} is not a directory: give the experiment directory (the one holding plan.yaml), or a .tar.gz or .zip archive")
    plan_path = os.path.join(root, PLAN_FILE)
    try:
        st = os.lstat(plan_path)
    except FileNotFoundError:
        raise FXError(f"{root} has no plan.yaml: an experiment directory needs one at its root") from None
    if not stat.S_ISREG(st.st_mode):
        raise FXError(f"{plan_path} is not a regular file: plan.yaml must be a file at the experiment directory's root")
    with open(plan_path, "rb") as f:
        plan_yaml = _plan_text(f.read(), plan_path)

    # Collect the entries first, so every problem shows before any byte is written.
    entries = []  # (archive name, full path, is_dir, executable)

    def walk(dirpath: str, prefix: str) -> None:
        with os.scandir(dirpath) as it:
            names = sorted(it, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
        for e in names:
            rel = prefix + e.name
            _check_name(rel, e.path, root)
            st = os.lstat(e.path)
            if stat.S_ISLNK(st.st_mode):
                raise FXError(
                    f"cannot pack {e.path}: it is a symbolic link: experiment archives hold only regular files "
                    "and directories (copy what it points to instead)"
                )
            if stat.S_ISDIR(st.st_mode):
                entries.append((rel + "/", e.path, True, True))
                walk(e.path, rel + "/")
            elif stat.S_ISREG(st.st_mode):
                entries.append((rel, e.path, False, bool(st.st_mode & 0o111)))
            else:
                raise FXError(f"cannot pack {e.path}: it is not a regular file or directory (a device, pipe or socket)")

    # Depth first, each directory's entries in byte order, as fx's Go packer.
    walk(root, "")

    f = out if out is not None else tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024)
    h = hashlib.sha256()

    class _Hashing(io.RawIOBase):
        def __init__(self) -> None:
            self.n = 0

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[override]
            b = bytes(b)
            h.update(b)
            f.write(b)
            self.n += len(b)
            return len(b)

    # Stored, not compressed, when model weights (.safetensors, which do not
    # compress) are most of the bytes, as fx's Go packer decides.
    total = weights = 0
    for name, full, is_dir, _ in entries:
        if not is_dir:
            size = os.stat(full).st_size
            total += size
            if name.endswith(".safetensors"):
                weights += size
    level = 0 if weights > 0 and weights >= total // 2 else 6

    sink = _Hashing()
    with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=level) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, full, is_dir, executable in entries:
                ti = tarfile.TarInfo(name.rstrip("/") if is_dir else name)
                ti.mtime = 0
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                if is_dir:
                    ti.type = tarfile.DIRTYPE
                    ti.mode = 0o755
                    tar.addfile(ti)
                    continue
                ti.type = tarfile.REGTYPE
                ti.mode = 0o755 if executable else 0o644
                with open(full, "rb") as src:
                    ti.size = os.fstat(src.fileno()).st_size
                    tar.addfile(ti, src)
    size = sink.n
    f.flush()
    return Archive(file=f, size=size, sha256=h.hexdigest(), plan_yaml=plan_yaml)


def open_archive(path: Union[str, os.PathLike]) -> Archive:
    """Opens an existing .tar.gz or .zip experiment archive for submission.

    Its plan.yaml (at the root, or under a single top-level directory) is read
    to send in the header; the director checks everything else.
    """
    p = os.fspath(path)
    with open(p, "rb") as f:
        head = f.read(4)
    plan = None
    try:
        if head[:2] == b"\x1f\x8b":
            with tarfile.open(p, mode="r:gz") as tar:
                members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
                name = _find_plan(list(members))
                if name:
                    plan = tar.extractfile(members[name]).read()  # type: ignore[union-attr]
        elif head[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(p) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
                name = _find_plan(names)
                if name:
                    plan = z.read(name)
        else:
            raise FXError(f"{p} is neither a directory nor a .tar.gz or .zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise FXError(f"cannot read the archive {p}: {e}") from None
    if plan is None:
        raise FXError(f"{p} has no plan.yaml at its root (or under a single top-level directory)")
    h = hashlib.sha256()
    f = open(p, "rb")
    for b in iter(lambda: f.read(CHUNK_SIZE), b""):
        h.update(b)
    size = f.tell()
    return Archive(file=f, size=size, sha256=h.hexdigest(), plan_yaml=_plan_text(plan, f"{p}: plan.yaml"))


def _find_plan(names) -> Optional[str]:
    if PLAN_FILE in names:
        return PLAN_FILE
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1:
        top = tops.pop()
        if f"{top}/{PLAN_FILE}" in names:
            return f"{top}/{PLAN_FILE}"
    return None


def load(path: Union[str, os.PathLike]) -> Archive:
    """Packs a directory, or opens an archive file."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return pack(p)
    if os.path.isfile(p):
        return open_archive(p)
    if not os.path.exists(p):
        raise FXError(f"{p} does not exist: give the experiment directory (the one holding plan.yaml) or an archive")
    raise FXError(f"{p} is neither a directory nor an archive file")
