"""Fixtures: the fx binary, a PKI, and a real federation (a director and two
envoys run as subprocesses on 127.0.0.1), all torn down at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

SDK = Path(__file__).resolve().parents[1]
REPO = SDK.parents[1]
sys.path.insert(0, str(SDK))

import fx  # noqa: E402

# Bounds on every wait in the fixtures.
BUILD_TIMEOUT = 900
START_TIMEOUT = 60
STOP_TIMEOUT = 15


def wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    """Waits until cond() is truthy (returning it) or fails naming what."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def workdir():
    d = tempfile.mkdtemp(prefix="fx-sdk-test-")
    yield Path(d)
    if os.environ.get("FX_KEEP_TMP"):
        print(f"kept {d}", file=sys.stderr)
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def fx_bin(workdir) -> Path:
    """The fx binary: $FX_BIN if set, else built from the repository."""
    if os.environ.get("FX_BIN"):
        return Path(os.environ["FX_BIN"]).resolve()
    out = workdir / "fx"
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.path.exists(go):
        pytest.fail("no go toolchain to build ./cmd/fx: put go on PATH, or set FX_BIN=/path/to/fx")
    try:
        subprocess.run([go, "build", "-o", str(out), "./cmd/fx"], cwd=REPO, check=True, timeout=BUILD_TIMEOUT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"go build ./cmd/fx failed:\n{e.stdout.decode(errors='replace')}")
    return out


@pytest.fixture(scope="session")
def pki(workdir, fx_bin) -> Path:
    """A federation PKI from scripts/pki-bootstrap.sh: director localhost, envoys site-1 and site-2."""
    d = workdir / "pki"
    env = dict(os.environ, FX=str(fx_bin))
    r = subprocess.run(["bash", str(REPO / "scripts" / "pki-bootstrap.sh"), "--dir", str(d), "site-1", "site-2"],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert r.returncode == 0, r.stdout.decode(errors="replace")
    return d


class Process:
    """A subprocess with its log file; stop() terminates it, then kills it."""

    def __init__(self, name: str, args: List[str], log: Path, cwd: Path):
        self.name, self.log = name, log
        self._f = open(log, "wb")
        self.p = subprocess.Popen(args, stdout=self._f, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(STOP_TIMEOUT)
        self._f.close()


class Cluster:
    """A running director and envoys, and how to reach them as a researcher."""

    def __init__(self, root: Path, pki: Path):
        self.root, self.pki = root, pki
        self.procs: List[Process] = []
        self.address: Optional[str] = None

    def researcher(self, **kw) -> dict:
        r = self.pki / "researcher"
        return {**dict(ca=str(r / "ca.crt"), cert=str(r / "researcher.crt"), key=str(r / "researcher.key")), **kw}

    def federation(self, address: Optional[str] = None, **kw) -> fx.Federation:
        kw.setdefault("server_name", "localhost")
        return fx.Federation(address or self.address, **self.researcher(**kw))

    def start_director(self) -> str:
        """Starts (or restarts) the director; returns the address it serves on."""
        n = sum(1 for p in self.procs if p.name.startswith("director"))
        log = self.root / ("director.log" if n == 0 else f"director-{n + 1}.log")
        d = Process("director", [str(self.fx_bin), "--log-json", "director", "start", "--config", str(self.root / "director.yaml")],
                    log, self.root)
        self.procs.insert(0, d)
        self.director = d
        addr = wait_for(lambda: _director_address(d.log) or (not d.alive() and "dead"), START_TIMEOUT, "the director to serve")
        assert addr != "dead", f"the director exited:\n{d.tail()}"
        return addr

    def stop_director(self, kill: bool = False) -> None:
        """Stops the director: SIGTERM (graceful), or SIGKILL (a crash)."""
        if kill and self.director.alive():
            self.director.p.kill()
            self.director.p.wait(STOP_TIMEOUT)
        self.director.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log}) ---\n{p.tail()}" for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def _director_address(log: Path) -> Optional[str]:
    try:
        for line in log.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("@message") == "director serving":
                return rec.get("address")
    except OSError:
        pass
    return None


def start_cluster(root: Path, pki: Path, fx_bin: Path, listen: str = "127.0.0.1:0") -> Cluster:
    """Starts a director (review auto) and envoys site-1 and site-2, each with
    half of a synthetic data set (8 features, 3 classes) tagged synthetic, and
    waits until both envoys are online. Their exec runners use /usr/bin/python3;
    site-1 shares its runners' output. The caller stops it."""
    root.mkdir(parents=True, exist_ok=True)
    c = Cluster(root, pki)
    c.fx_bin = fx_bin
    try:
        (root / "director.yaml").write_text(f"""\
listen_address: {listen}
advertise: {{host: 127.0.0.1}}
tls:
  cert: {pki}/director/localhost.crt
  key: {pki}/director/localhost.key
  ca: {pki}/director/ca.crt
  crl: {pki}/ca/crl.pem
data_dir: {root}/director
heartbeat_period: 1s
offline_after: 5s
review_policy: auto
aggregator: {{host: 127.0.0.1, port_min: 0, port_max: 0}}
stop_timeout: 5s
""")
        c.address = c.start_director()
        for i in (1, 2):
            name = f"site-{i}"
            ep = pki / "envoys" / name
            cfg = root / f"{name}.yaml"
            cfg.write_text(f"""\
name: {name}
director: {{address: "{c.address}", server_name: localhost}}
tls: {{cert: {ep}/{name}.crt, key: {ep}/{name}.key, ca: {ep}/ca.crt}}
work_dir: {root}/{name}
tags: [synthetic]
shard: {{kind: synthetic, path: "", features: 8, classes: 3, train_samples: 600, valid_samples: 120, shard: {i}/2, seed: 7}}
review: {{policy: auto}}
exec: {{python: /usr/bin/python3, share_logs: {"true" if i == 1 else "false"}}}
max_experiments: 4
rpc_timeout: 10s
retry: {{initial: 100ms, max: 2s}}
""")
            c.procs.append(Process(name, [str(fx_bin), "envoy", "start", "--config", str(cfg)], root / f"{name}.log", root))
        with c.federation() as fed:
            def online():
                for p in c.procs:
                    assert p.alive(), f"{p.name} exited:\n{p.tail()}"
                return len(fed.envoys(online_only=True)) == 2
            wait_for(online, START_TIMEOUT, "two envoys online", interval=0.1)
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture(scope="session")
def cluster(workdir, fx_bin, pki):
    """The session's federation (see start_cluster)."""
    c = start_cluster(workdir / "cluster", pki, fx_bin)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def fed(cluster):
    f = cluster.federation()
    yield f
    f.close()


SYNTH_PLAN = """\
name: {name}
rounds: {rounds}
participants: {{min: 2, tags: [synthetic]}}
runner: {{kind: builtin, model: softmax, hyperparameters: {{lr: 0.1, epochs: {epochs}, batch_size: 32}}}}
stragglers: {{deadline: 20s}}
best_model: {{metric: accuracy, mode: max}}
"""


@pytest.fixture
def make_experiment(tmp_path):
    """Writes an experiment directory with a synthetic-data softmax plan."""
    counter = [0]

    def make(name: str, rounds: int = 2, epochs: int = 1, plan: Optional[str] = None) -> Path:
        counter[0] += 1
        d = tmp_path / f"exp{counter[0]}"
        d.mkdir()
        (d / "plan.yaml").write_text(plan if plan is not None else SYNTH_PLAN.format(name=name, rounds=rounds, epochs=epochs))
        return d

    return make


class Proxy:
    """A TCP proxy to cut a client's connections on purpose.

    drop() closes every open connection; while blocked, new connections are
    closed as soon as they are accepted."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.address = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.accepted = 0
        self.blocked = False
        self._socks: List[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            if self.blocked:
                c.close()
                continue
            try:
                u = socket.create_connection(self.upstream, timeout=5)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            with self._lock:
                self.accepted += 1
                self._socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self.lsock.close()
        self.drop()


@pytest.fixture
def proxy(cluster):
    p = Proxy(cluster.address)
    yield p
    p.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="session")
def other_pki(workdir, fx_bin) -> Path:
    """A second federation's PKI: its CA is not the test federation's."""
    d = workdir / "other-pki"
    env = dict(os.environ, FX=str(fx_bin))
    r = subprocess.run(["bash", str(REPO / "scripts" / "pki-bootstrap.sh"), "--dir", str(d), "site-1"],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert r.returncode == 0, r.stdout.decode(errors="replace")
    return d
