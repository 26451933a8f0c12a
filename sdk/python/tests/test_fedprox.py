"""FedProx in fx.site: task.proximal_mu and task.proximal_term."""

from __future__ import annotations

import pytest

from fx import site

try:
    import torch
except ImportError:  # pragma: no cover - Debian's python3-torch is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (apt-get install python3-torch)")


def _task(path, mu=None, task="train"):
    spec = {"type": "task", "id": 1, "task": task, "train": task == "train", "round": 1, "input_model": str(path)}
    if mu is not None:
        spec["proximal_mu"] = mu
    return site.Task(spec, per_task=False)


def test_proximal_mu_defaults_to_zero(tmp_path):
    assert _task(tmp_path / "m.safetensors").proximal_mu == 0.0
    assert _task(tmp_path / "m.safetensors", mu=0.25).proximal_mu == 0.25


@needs_torch
def test_proximal_term_by_hand(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "global.safetensors"
    site.save_model(model, str(path))
    with torch.no_grad():
        model.weight += torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.5, 0.0]])  # Σδ² = 1 + 4 + 0.25
        model.bias -= torch.tensor([0.0, 3.0])  # Σδ² = 9
    task = _task(path, mu=0.1)
    term = task.proximal_term(model)
    assert term.dim() == 0
    assert term.item() == pytest.approx(0.1 / 2 * 14.25, rel=1e-6)
    # Its gradient is μ(p − p_global), and none flows into the global copy.
    term.backward()
    assert torch.allclose(model.weight.grad, 0.1 * torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.5, 0.0]]), atol=1e-6)
    assert torch.allclose(model.bias.grad, 0.1 * torch.tensor([0.0, -3.0]), atol=1e-6)
    assert all(not g.requires_grad for g in task._global.values())
    # The centre stays the task's model while the module trains on.
    with torch.no_grad():
        model.bias += torch.tensor([0.0, 3.0])
    assert task.proximal_term(model).item() == pytest.approx(0.1 / 2 * 5.25, rel=1e-6)


@needs_torch
def test_proximal_term_zero_mu_reads_nothing(tmp_path):
    model = torch.nn.Linear(2, 2)
    term = _task(tmp_path / "absent.safetensors", mu=0).proximal_term(model)
    assert term.item() == 0.0


@needs_torch
def test_proximal_term_refuses_misuse(tmp_path):
    path = tmp_path / "global.safetensors"
    site.save_model(torch.nn.Linear(3, 2), str(path))
    with pytest.raises(ValueError, match="not in the task's model"):
        _task(path, mu=0.1).proximal_term(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    with pytest.raises(RuntimeError, match="belongs in the train task"):
        _task(path, mu=0.1, task="aggregated_model_validation").proximal_term(torch.nn.Linear(3, 2))
