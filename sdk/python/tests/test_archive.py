"""Packing experiment directories."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
import zipfile

import pytest

import fx
from fx.archive import load, open_archive, pack


def tree(root, files):
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return root


def members(arc):
    with tarfile.open(fileobj=io.BytesIO(arc.read()), mode="r:gz") as t:
        return [(m.name, m.type, m.mode, m.mtime, m.uid, m.gid, m.uname, m.gname) for m in t.getmembers()]


def test_pack_contents_and_digest(tmp_path):
    d = tree(tmp_path / "exp", {"plan.yaml": b"name: x\n", "train.py": b"print(1)\n", "data/a.txt": b"a", "data/b/c.txt": b"c"})
    os.chmod(d / "train.py", 0o700)
    arc = pack(d)
    data = arc.read()
    assert arc.size == len(data) and arc.sha256 == hashlib.sha256(data).hexdigest()
    assert arc.plan_yaml == "name: x\n"
    assert data[:2] == b"\x1f\x8b"
    ms = members(arc)
    names = [m[0] for m in ms]
    assert names == ["data", "data/a.txt", "data/b", "data/b/c.txt", "plan.yaml", "train.py"]
    modes = {m[0]: m[2] for m in ms}
    assert modes["train.py"] == 0o755 and modes["plan.yaml"] == 0o644 and modes["data"] == 0o755
    assert all(m[3:] == (0, 0, 0, "", "") for m in ms)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
        assert t.extractfile("data/b/c.txt").read() == b"c"
    # The gzip header carries no name and no time.
    assert data[4:8] == b"\0\0\0\0" and not (data[3] & 0x08)


def test_pack_is_deterministic(tmp_path):
    d = tree(tmp_path / "exp", {"plan.yaml": b"name: x\n", "z.txt": b"z", "a/b.txt": b"b"})
    first = pack(d).read()
    t = time.time() + 1000
    for p in d.rglob("*"):
        os.utime(p, (t, t))
    assert pack(d).read() == first


def test_pack_requires_plan(tmp_path):
    d = tree(tmp_path / "exp", {"sub/plan.yaml": b"name: x\n"})
    with pytest.raises(fx.FXError, match="no plan.yaml"):
        pack(d)
    (d / "plan.yaml").mkdir()
    with pytest.raises(fx.FXError, match="not a regular file"):
        pack(d)
    with pytest.raises(fx.FXError, match="does not exist"):
        pack(tmp_path / "nowhere")


def test_pack_refuses_symlinks(tmp_path):
    d = tree(tmp_path / "exp", {"plan.yaml": b"name: x\n"})
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", d / "link")
    with pytest.raises(fx.FXError, match="symbolic link"):
        pack(d)
    os.remove(d / "link")
    os.symlink(d / "plan.yaml", d / "plan2.yaml")
    with pytest.raises(fx.FXError, match="plan2.yaml.*symbolic link"):
        pack(d)


def test_plan_symlink_refused(tmp_path):
    d = tmp_path / "exp"
    d.mkdir()
    (tmp_path / "plan.yaml").write_text("name: x\n")
    os.symlink(tmp_path / "plan.yaml", d / "plan.yaml")
    with pytest.raises(fx.FXError, match="not a regular file"):
        pack(d)


def test_pack_refuses_bad_names_and_fifos(tmp_path):
    d = tree(tmp_path / "exp", {"plan.yaml": b"name: x\n", "a\\b": b"x"})
    with pytest.raises(fx.FXError, match="backslash"):
        pack(d)
    os.remove(d / "a\\b")
    os.mkfifo(d / "pipe")
    with pytest.raises(fx.FXError, match="pipe"):
        pack(d)


def test_plan_must_be_utf8(tmp_path):
    d = tree(tmp_path / "exp", {"plan.yaml": b"name: \xff\n"})
    with pytest.raises(fx.FXError, match="UTF-8"):
        pack(d)


def test_existing_archives(tmp_path):
    d = tree(tmp_path / "exp", {"plan.yaml": b"name: t\n"})
    tgz = tmp_path / "exp.tar.gz"
    tgz.write_bytes(pack(d).read())
    a = open_archive(tgz)
    assert a.plan_yaml == "name: t\n" and a.size == tgz.stat().st_size
    assert a.sha256 == hashlib.sha256(tgz.read_bytes()).hexdigest()
    a.close()
    z = tmp_path / "exp.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("top/plan.yaml", "name: z\n")
        zf.writestr("top/run.py", "")
    assert load(z).plan_yaml == "name: z\n"
    with zipfile.ZipFile(tmp_path / "noplan.zip", "w") as zf:
        zf.writestr("run.py", "")
    with pytest.raises(fx.FXError, match="no plan.yaml"):
        load(tmp_path / "noplan.zip")
    (tmp_path / "junk.bin").write_bytes(b"hello")
    with pytest.raises(fx.FXError, match="neither"):
        load(tmp_path / "junk.bin")


def test_chunks_are_at_most_one_mib(tmp_path):
    d = tree(tmp_path / "exp", {"plan.yaml": b"name: x\n", "big.bin": os.urandom(3 * 1024 * 1024)})
    arc = pack(d)
    sizes = [len(c) for c in arc.chunks()]
    assert max(sizes) <= 1024 * 1024 and sum(sizes) == arc.size and len(sizes) >= 3
