"""SCAFFOLD in fx.site: task.scaffold, scaffold_correction, scaffold_correct and send's steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fx import site

try:
    import torch
except ImportError:  # pragma: no cover - Debian's python3-torch is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (apt-get install python3-torch)")


def _task(tmp_path, correction=None, task="train"):
    spec = {
        "type": "task", "id": 1, "task": task, "train": task == "train", "round": 1,
        "input_model": str(tmp_path / "m.safetensors"),
        "output_model": str(tmp_path / "out.safetensors"), "output_metrics": str(tmp_path / "metrics.json"),
    }
    if correction is not None:
        spec["scaffold"] = {"correction": str(correction)}
    return site.Task(spec, per_task=True)


def test_not_scaffold(tmp_path):
    task = _task(tmp_path)
    assert not task.scaffold
    assert task.scaffold_correction() == {}


def test_correction_as_numpy(tmp_path):
    path = tmp_path / "c.safetensors"
    site.save_model({"w": np.array([[0.5, -1.0]], dtype=np.float32)}, str(path))
    task = _task(tmp_path, correction=path)
    assert task.scaffold
    np.testing.assert_array_equal(task.scaffold_correction()["w"], np.array([[0.5, -1.0]], dtype=np.float32))


def test_send_reports_steps(tmp_path):
    path = tmp_path / "c.safetensors"
    weights = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    site.save_model(weights, str(tmp_path / "m.safetensors"))
    site.save_model({"w": np.zeros(2, dtype=np.float32)}, str(path))
    with pytest.raises(ValueError, match="must send steps"):
        _task(tmp_path, correction=path).send(weights, samples=4)
    with pytest.raises(ValueError, match="steps must be"):
        _task(tmp_path, correction=path).send(weights, samples=4, steps=0, step_size=0.1)
    _task(tmp_path, correction=path).send(weights, samples=4, steps=12, step_size=0.5)
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result == {"samples": 4, "metrics": {}, "steps": 12, "step_size": 0.5}
    # Without SCAFFOLD nothing more is written.
    _task(tmp_path).send(weights, samples=4, steps=12, step_size=0.5)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"samples": 4, "metrics": {}}


@needs_torch
def test_scaffold_correct_by_hand(tmp_path):
    model = torch.nn.Linear(2, 1)
    path = tmp_path / "c.safetensors"
    site.save_model({"weight": np.array([[0.5, -1.0]], dtype=np.float32), "bias": np.array([2.0], dtype=np.float32)}, str(path))
    task = _task(tmp_path, correction=path)
    model.zero_grad()
    model(torch.tensor([[1.0, 3.0]])).sum().backward()  # ∇w = x = [1, 3], ∇b = 1
    task.scaffold_correct(model)
    assert torch.allclose(model.weight.grad, torch.tensor([[1.5, 2.0]]))
    assert torch.allclose(model.bias.grad, torch.tensor([3.0]))
    # Every step: the correction is added again to the step's gradient.
    model.zero_grad()
    model(torch.tensor([[0.0, 0.0]])).sum().backward()  # ∇w = 0, ∇b = 1
    task.scaffold_correct(model)
    assert torch.allclose(model.weight.grad, torch.tensor([[0.5, -1.0]]))
    assert torch.allclose(model.bias.grad, torch.tensor([3.0]))


@needs_torch
def test_scaffold_correct_without_scaffold_or_misused(tmp_path):
    model = torch.nn.Linear(2, 1)
    model(torch.tensor([[1.0, 3.0]])).sum().backward()
    before = model.weight.grad.clone()
    _task(tmp_path).scaffold_correct(model)
    assert torch.equal(model.weight.grad, before)
    path = tmp_path / "c.safetensors"
    site.save_model({"other": np.zeros(2, dtype=np.float32)}, str(path))
    with pytest.raises(ValueError, match="have no SCAFFOLD correction"):
        _task(tmp_path, correction=path).scaffold_correct(model)
    with pytest.raises(RuntimeError, match="belongs in the train task"):
        _task(tmp_path, correction=path, task="aggregated_model_validation").scaffold_correct(model)
