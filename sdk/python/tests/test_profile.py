"""fx.load_profile and Federation.from_profile read the CLI's profile the
way the CLI does: the same file lookup, the same precedence, the same paths."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import fx
from fx.profile import load_profile


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No FX_* settings, and a config directory of our own."""
    for k in list(os.environ):
        if k.startswith("FX_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_lookup_order_and_precedence(clean_env, monkeypatch):
    tmp = clean_env
    # Nothing: the defaults, relative to the working directory.
    p = load_profile()
    assert p.path is None and p.director == "localhost:50051" and p.cert == os.path.join("pki", "researcher", "researcher.crt")
    assert p.timeout == 10 and p.server_name is None

    # The default profile, when it exists.
    default = write(tmp / "config" / "fx" / "config.yaml", "director: d.example.org:1\ncert: alice.crt\n")
    p = load_profile()
    assert p.path == str(default) and p.director == "d.example.org:1"
    assert p.cert == str(tmp / "config" / "fx" / "alice.crt")  # relative to the profile
    assert p.key == os.path.join("pki", "researcher", "researcher.key")  # a default stays relative to here

    # $FX_PROFILE over the default; an explicit path over both.
    env_profile = write(tmp / "env" / "p.yaml", "director: e.example.org:2\n")
    monkeypatch.setenv("FX_PROFILE", str(env_profile))
    assert load_profile().director == "e.example.org:2"
    explicit = write(tmp / "x" / "profile.yaml", "director: x.example.org:3\nca: /abs/ca.crt\ntimeout: 1m30s\nserver_name: localhost\n")
    p = load_profile(explicit)
    assert (p.director, p.ca, p.timeout, p.server_name, p.path) == ("x.example.org:3", "/abs/ca.crt", 90, "localhost", str(explicit))

    # FX_* variables over the profile, as the CLI's flags > environment > file.
    monkeypatch.setenv("FX_DIRECTOR", "env.example.org:4")
    monkeypatch.setenv("FX_CERT", "mine.crt")
    p = load_profile(explicit)
    assert p.director == "env.example.org:4" and p.cert == "mine.crt"


def test_the_yaml_form(clean_env):
    p = load_profile(write(clean_env / "p.yaml", """\
# the researcher's settings
---
director: "127.0.0.1:50051"   # a comment after a value
server_name: 'localhost'
cert: 'dir with # hash/r.crt'
key:   r.key
ca: ca.crt
"""))
    assert p.director == "127.0.0.1:50051" and p.server_name == "localhost"
    assert p.cert.endswith("dir with # hash/r.crt") and p.key.endswith("/r.key")


@pytest.mark.parametrize("text,says", [
    ("directory: x:1\n", ["line 1", "unknown key 'directory'", "director, server_name"]),
    ("director: x:1\n  cert: a\n", ["line 2", "indented"]),
    ("tls:\n  cert: a\n", ["line 1", "unknown key 'tls'"]),
    ("director: [a, b]\n", ["line 1", "not a plain value"]),
    ("director x:1\n", ["line 1", "not 'key: value'"]),
    ("timeout: 10\n", ["line 1", "no unit", "10s"]),
    ("timeout: soon\n", ["line 1", "10s, 1m30s"]),
    ("cert: 'a\n", ["line 1", "not closed"]),
    ("cert: a\ncert: b\n", ["line 2", "twice"]),
])
def test_mistakes_are_named(clean_env, text, says):
    path = write(clean_env / "bad.yaml", text)
    with pytest.raises(fx.FXError) as e:
        load_profile(path)
    for s in says + [str(path)]:
        assert s in str(e.value), (s, str(e.value))


def test_a_named_profile_must_exist(clean_env, monkeypatch):
    with pytest.raises(fx.FXError, match="does not exist"):
        load_profile(clean_env / "nope.yaml")
    monkeypatch.setenv("FX_PROFILE", str(clean_env / "gone.yaml"))
    with pytest.raises(fx.FXError, match=r"gone.yaml \(named by \$FX_PROFILE\) does not exist"):
        load_profile()
    monkeypatch.delenv("FX_PROFILE")
    with pytest.raises(fx.FXError, match="no profile.*FX_PROFILE is not set.*from_profile"):
        fx.Federation.from_profile()


def test_from_profile_reaches_the_federation_the_cli_reaches(cluster, fx_bin, clean_env):
    """A profile with paths relative to it, in a directory of its own: the
    Python client and the fx CLI both reach the director through it."""
    home = clean_env / "alice"
    home.mkdir()
    r = cluster.pki / "researcher"
    for f in ("researcher.crt", "researcher.key", "ca.crt"):
        shutil.copy(r / f, home / f)
    profile = write(home / "profile.yaml", f"director: {cluster.address}\nserver_name: localhost\n"
                                           "cert: researcher.crt\nkey: researcher.key\nca: ca.crt\ntimeout: 20s\n")
    with fx.Federation.from_profile(profile) as fed:
        assert fed.timeout == 20
        assert sorted(e.name for e in fed.envoys(online_only=True)) == ["site-1", "site-2"]
    out = subprocess.run([str(fx_bin), "envoys", "list", "--profile", str(profile)], capture_output=True, text=True, timeout=60,
                         cwd=str(clean_env))
    assert out.returncode == 0 and "site-1" in out.stdout, out.stderr
