"""fx.site, the site library, against a stand-in for fx that speaks the runner
protocols to a real subprocess (the Go side is tested in runner/exec and e2e)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fx import site
from fx.safetensors import load_safetensors, save_safetensors

SDK = Path(__file__).resolve().parents[1]

try:
    import torch
except ImportError:  # pragma: no cover - Debian's python3-torch is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (apt-get install python3-torch)")


class FakeFX:
    """Starts a script as fx's persistent runner does and talks to it over its control pipes."""

    def __init__(self, tmp: Path, script: str, setup: dict):
        self.tmp = tmp
        (tmp / "train.py").write_text(textwrap.dedent(script))
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        # The child gets the pipes as fds 3 and 4, as fx hands them over.
        def child():
            a, b = os.dup(to_r), os.dup(from_w)  # out of the way of 3 and 4 first
            os.dup2(a, 3, inheritable=True)
            os.dup2(b, 4, inheritable=True)

        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(SDK),
            "FX_PROTOCOL": "2",
            "FX_CONTROL_IN": "3",
            "FX_CONTROL_OUT": "4",
            "HOME": str(tmp),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "train.py"], cwd=tmp, env=env, preexec_fn=child, pass_fds=(3, 4),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        os.close(to_r)
        os.close(from_w)
        self.w = os.fdopen(self._to_w, "wb", buffering=0)
        self.r = os.fdopen(self._from_r, "rb")
        self.send({"type": "setup", "protocol": 2, "seed": 7, "hyperparameters": {"lr": 0.5}, "data": {"kind": "test"},
                   "experiment_dir": str(tmp), "work_dir": str(tmp), "timeout_seconds": 60, **setup})

    def send(self, msg: dict) -> None:
        self.w.write(json.dumps(msg).encode() + b"\n")

    def recv(self) -> dict:
        line = self.r.readline()
        assert line, f"the runner closed its pipe; stderr: {self.stderr()}"
        return json.loads(line)

    def task(self, id_: int, name: str, round_: int, model: str, output: str = "") -> dict:
        self.send({"type": "task", "id": id_, "task": name, "train": name == "train", "round": round_,
                   "input_model": model, "output_model": output, "timeout_seconds": 60, "deadline": "2030-01-01T00:00:00Z"})
        return self.recv()

    def stop(self) -> int:
        self.send({"type": "stop"})
        self.w.close()
        return self.proc.wait(timeout=60)

    def stderr(self) -> str:
        self.proc.kill()
        return self.proc.communicate(timeout=60)[1].decode()


def test_numpy_model_round_trip(tmp_path):
    model = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.5, -2.25], dtype=np.float64),
        "c": np.array([7, 8, 9], dtype=np.int64),
        "d": np.array([0.5, 1.0], dtype=np.float16),
    }
    site.save_model(model, tmp_path / "m.safetensors")
    back = site.load_model(tmp_path / "m.safetensors")
    assert sorted(back) == sorted(model)
    for k in model:
        assert back[k].dtype == model[k].dtype and np.array_equal(back[k], model[k]), k
    # Readable by the notebook client's reader too: the format is the same.
    assert np.array_equal(load_safetensors(tmp_path / "m.safetensors")["a"], model["a"])


@needs_torch
def test_torch_state_dict_keeps_names_and_dtypes(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    net[0].to(torch.bfloat16)
    site.save_model(net, tmp_path / "m.safetensors")
    back = site.load_model(tmp_path / "m.safetensors", torch=True)
    state = net.state_dict()
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype, k
        assert torch.equal(back[k], v), k
    assert back["1.num_batches_tracked"].dtype == torch.int64
    assert back["0.weight"].dtype == torch.bfloat16


def test_persistent_tasks_numpy(tmp_path):
    save_safetensors({"w": np.ones((2, 3), np.float32), "b": np.zeros(2, np.float16)}, tmp_path / "global.safetensors")
    fx = FakeFX(tmp_path, """
        from fx import site
        lr = site.hyperparameters()["lr"]
        print("starting with seed", site.seed(), flush=True)
        for task in site.tasks():
            m = task.model()
            if task.train:
                task.send({"w": m["w"] * lr, "b": m["b"] + 1}, samples=12, metrics={"loss": 0.25})
            else:
                task.send(samples=5, metrics={"accuracy": float(m["w"].sum()) / 10})
    """, {})
    assert fx.recv() == {"type": "ready", "protocol": 2}
    g = str(tmp_path / "global.safetensors")
    out = str(tmp_path / "trained.safetensors")
    assert fx.task(1, "aggregated_model_validation", 1, g) == {"type": "done", "id": 1, "samples": 5, "metrics": {"accuracy": 0.6}}
    assert fx.task(2, "train", 1, g, out) == {"type": "done", "id": 2, "samples": 12, "metrics": {"loss": 0.25}}
    trained = load_safetensors(out)
    assert trained["w"].dtype == np.float32 and np.allclose(trained["w"], 0.5)
    assert trained["b"].dtype == np.float16 and np.allclose(trained["b"], 1)  # sent as float64, kept F16
    assert fx.task(3, "locally_tuned_model_validation", 1, out)["metrics"] == {"accuracy": 0.3}
    assert fx.stop() == 0


@needs_torch
def test_persistent_tasks_torch(tmp_path):
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.zero_()
    net.to(torch.bfloat16)
    site.save_model(net, tmp_path / "global.safetensors")
    fx = FakeFX(tmp_path, """
        import torch
        from fx import site
        net = torch.nn.Linear(3, 2)          # float32 here; the experiment's model is bfloat16
        for task in site.tasks():
            net.load_state_dict(task.state_dict())
            with torch.no_grad():
                net.weight.mul_(3)
            task.send(net, samples=1, metrics={"w00": float(net.weight[0, 0])})
    """, {})
    assert fx.recv()["type"] == "ready"
    out = str(tmp_path / "trained.safetensors")
    rep = fx.task(1, "train", 1, str(tmp_path / "global.safetensors"), out)
    assert rep == {"type": "done", "id": 1, "samples": 1, "metrics": {"w00": 3.0}}
    back = site.load_model(out, torch=True)
    assert back["weight"].dtype == torch.bfloat16 and torch.all(back["weight"] == 3)
    assert fx.stop() == 0


def test_send_checks_the_weights(tmp_path):
    save_safetensors({"w": np.ones((2, 3), np.float32)}, tmp_path / "global.safetensors")
    fx = FakeFX(tmp_path, """
        import numpy as np
        from fx import site
        for task in site.tasks():
            if task.round == 1:
                task.send({"w": np.ones((3, 2))}, samples=1)      # wrong shape: raises
    """, {})
    assert fx.recv()["type"] == "ready"
    fx.send({"type": "task", "id": 1, "task": "train", "train": True, "round": 1,
             "input_model": str(tmp_path / "global.safetensors"), "output_model": str(tmp_path / "o.safetensors")})
    assert fx.proc.wait(timeout=60) != 0
    assert "tensor 'w' has shape [3, 2], the model's is [2, 3]" in fx.proc.stderr.read().decode()


def test_a_task_left_unanswered_fails(tmp_path):
    save_safetensors({"w": np.ones(2, np.float32)}, tmp_path / "global.safetensors")
    fx = FakeFX(tmp_path, """
        from fx import site
        for task in site.tasks():
            if task.round == 2:
                task.send(samples=1)
    """, {})
    assert fx.recv()["type"] == "ready"
    g = str(tmp_path / "global.safetensors")
    rep = fx.task(1, "aggregated_model_validation", 1, g)
    assert rep["type"] == "failed" and rep["id"] == 1 and "without task.send()" in rep["error"]
    assert fx.task(2, "aggregated_model_validation", 2, g)["type"] == "done"
    assert fx.stop() == 0


def test_data_is_mapped_from_the_data_file(tmp_path):
    # The layout fx writes (runner/exec.WriteDataFile).
    x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    y = np.array([2, 0, 1], dtype=np.int64)
    save_safetensors({"train.x": x, "train.y": y, "valid.x": x[:1], "valid.y": y[:1]}, tmp_path / "data.safetensors",
                     metadata={"classes": "3", "sample_shape": "[2, 2]", "description": "tiny"})
    fx = FakeFX(tmp_path, """
        import json
        from fx import site
        d = site.data()
        print(json.dumps({"n": len(d.train), "nv": len(d.valid), "classes": d.classes, "shape": d.sample_shape,
                          "sum": float(d.train.x.sum()), "y": d.train.y.tolist(), "ydtype": str(d.train.y.dtype),
                          "kind": d.settings["kind"]}), flush=True)
        for task in site.tasks():
            pass
    """, {"data_file": str(tmp_path / "data.safetensors")})
    assert fx.recv()["type"] == "ready"
    assert fx.stop() == 0
    got = json.loads(fx.proc.stdout.read().decode().strip())
    assert got == {"n": 3, "nv": 1, "classes": 3, "shape": [2, 2], "sum": 66.0, "y": [2, 0, 1], "ydtype": "int64", "kind": "test"}


def test_outside_fx_says_so(tmp_path):
    (tmp_path / "t.py").write_text("from fx import site\nfor t in site.tasks(): pass\n")
    p = subprocess.run([sys.executable, "t.py"], cwd=tmp_path, env={"PYTHONPATH": str(SDK), "PATH": "/usr/bin:/bin"},
                       capture_output=True, timeout=60)
    assert p.returncode != 0 and b"not running under fx" in p.stderr
