"""examples/notebooks/fashion_mnist.ipynb: valid nbformat 4, and it runs."""

from __future__ import annotations

import json
import os
import sys
import types

from conftest import REPO, free_port

NOTEBOOK = REPO / "examples" / "notebooks" / "fashion_mnist.ipynb"


def load():
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def test_notebook_is_valid_nbformat4():
    nb = load()
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = set()
    for i, cell in enumerate(nb["cells"]):
        assert cell["cell_type"] in ("markdown", "code"), i
        assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
        assert "metadata" in cell
        if nb["nbformat_minor"] >= 5:
            assert cell["id"] not in ids
            ids.add(cell["id"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            compile("".join(cell["source"]), f"cell {i}", "exec")
    try:
        import nbformat
    except ImportError:
        return
    nbformat.validate(nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4))


def test_notebook_runs_against_a_quickstart_layout(cluster, fx_bin, pki, workdir, capsys):
    """Lay out a directory as fx quickstart does (pki/, director.yaml,
    envoys/*.yaml), let the notebook start that federation itself, and run
    every code cell; without Fashion-MNIST shards it trains on the synthetic
    data, and without matplotlib it prints the table."""
    # Short paths: the envoys' admin sockets live under it (sun_path is 108 bytes).
    qs = workdir / "nb" / "fx-quickstart"
    qs.mkdir(parents=True)
    os.symlink(pki, qs / "pki")
    addr = f"127.0.0.1:{free_port()}"
    (qs / "director.yaml").write_text(
        (cluster.root / "director.yaml").read_text()
        .replace("listen_address: 127.0.0.1:0", f"listen_address: {addr}")
        .replace(f"{cluster.root}/director", f"{qs}/director")
    )
    (qs / "envoys").mkdir()
    for name in ("site-1", "site-2"):
        (qs / "envoys" / f"{name}.yaml").write_text(
            (cluster.root / f"{name}.yaml").read_text()
            .replace(cluster.address, addr)
            .replace(f"{cluster.root}/{name}", f"{qs}/envoys/{name}")
        )
    cells = [c for c in load()["cells"] if c["cell_type"] == "code"]
    ns: dict = {"__name__": "__notebook__"}
    exec(compile("".join(cells[0]["source"]), "parameters", "exec"), ns)
    ns.update(WORKDIR=str(qs), FX=str(fx_bin), ROUNDS=2)
    try:
        for i, cell in enumerate(cells[1:], 1):
            exec(compile("".join(cell["source"]), f"cell {i}", "exec"), ns)
    finally:
        for p in ns.get("started", []):
            if p.poll() is None:
                p.kill()
                p.wait(15)
    out = capsys.readouterr().out
    assert len(ns["started"]) == 3  # it started the director and two envoys
    assert ns["DIRECTOR"] == addr and ns["TAG"] == "synthetic"
    assert ns["status"].state == "FINISHED"
    assert [r["round"] for r in ns["accuracy"]] == [1, 2, 3]
    w = ns["weights"]
    assert {k: v.shape for k, v in w.items()} == {"fc0.weight": (32, 8), "fc0.bias": (32,), "fc1.weight": (3, 32), "fc1.bias": (3,)}
    assert os.path.getsize(qs / "notebook-best.safetensors") == ns["info"].size
    assert "global model after round 0" in out and "done" in out
    if ns["plt"] is None:
        assert "model after round" in out
    assert all(p.poll() is not None for p in ns["started"])  # the last cell stopped them

    # The plot cell again, with a stand-in for matplotlib when it is missing.
    plot_cell = next(c for c in cells if "matplotlib" in "".join(c["source"]))
    calls = []

    class Recorder:
        def __getattr__(self, name):
            def record(*args, **kwargs):
                calls.append(name)
                return (Recorder(), Recorder()) if name == "subplots" else None
            return record

    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = Recorder().subplots
    pyplot.show = Recorder().show
    mpl = types.ModuleType("matplotlib")
    mpl.pyplot = pyplot
    saved = {k: sys.modules.get(k) for k in ("matplotlib", "matplotlib.pyplot")}
    sys.modules.update({"matplotlib": mpl, "matplotlib.pyplot": pyplot})
    try:
        exec(compile("".join(plot_cell["source"]), "plot cell", "exec"), ns)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert calls[0] == "subplots" and "plot" in calls and calls[-1] == "show"
