"""examples/notebooks/fashion_mnist.ipynb: valid nbformat 4 with a
parameters cell and plots, and it runs as its introduction says: headless
with Debian's jupyter-nbconvert, from its own directory, against
`fx quickstart --keep-running` through the profile quickstart writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

from conftest import REPO, START_TIMEOUT, STOP_TIMEOUT, wait_for

NOTEBOOK = REPO / "examples" / "notebooks" / "fashion_mnist.ipynb"

# Bounds: the notebook's experiment (two rounds on generated data) and the
# kernel's start, on a loaded machine.
EXECUTE_TIMEOUT = 600


def load():
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


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


def test_notebook_has_parameters_and_plots():
    cells = code_cells(load())
    # The first code cell holds the parameters, tagged as papermill and
    # nbconvert users expect, and nothing else.
    params = cells[0]
    assert "parameters" in params["metadata"].get("tags", [])
    source = "".join(params["source"])
    for name in ("PROFILE", "ROUNDS", "OUT"):
        assert f"\n{name} = " in "\n" + source, name
    # It reaches the federation through the CLI's profile, not through
    # files of a quickstart directory it guesses at.
    everything = "".join("".join(c["source"]) for c in cells)
    assert "Federation.from_profile(PROFILE)" in everything and "director.yaml" not in everything
    plot = next(c for c in cells if "matplotlib" in "".join(c["source"]))
    plot = "".join(plot["source"])
    assert '"accuracy", "loss"' in plot and "plt.show()" in plot


@pytest.fixture
def quickstart(fx_bin, tmp_path):
    """`fx quickstart --keep-running` on generated data, until its
    federation is up for more experiments; stopped with Ctrl-C after."""
    work = tmp_path / "qs"
    log = tmp_path / "quickstart.out"
    with open(log, "wb") as out:
        p = subprocess.Popen([str(fx_bin), "quickstart", "--keep-running", "--data", "synthetic", "--envoys", "2",
                              "--rounds", "1", "--workdir", str(work)],
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up():
            assert p.poll() is None, f"fx quickstart exited:\n{log.read_text(errors='replace')}"
            return "keeps running" in log.read_text(errors="replace")
        wait_for(up, START_TIMEOUT + 120, "fx quickstart --keep-running to finish its experiment", interval=0.1)
        yield work / "profile.yaml"
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(STOP_TIMEOUT + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(STOP_TIMEOUT)
    assert p.returncode == 0, log.read_text(errors="replace")
    assert "federation stopped" in log.read_text(errors="replace")


def test_notebook_runs_headless_against_quickstart(quickstart, tmp_path):
    """jupyter-nbconvert executes the notebook from its own directory, with
    the profile `fx quickstart --keep-running` wrote as FX_PROFILE and the
    SDK found relative to the notebook: every cell runs, the experiment
    finishes, the plots are drawn and the best model is saved."""
    nbconvert = shutil.which("jupyter-nbconvert")
    if nbconvert is None:
        pytest.skip("jupyter-nbconvert is not installed: apt-get install jupyter-nbconvert python3-ipykernel python3-matplotlib")
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FX_") and k != "PYTHONPATH"}
    env.update(FX_PROFILE=str(quickstart), FX_NB_ROUNDS="2", FX_NB_OUT=str(out), XDG_CONFIG_HOME=str(tmp_path / "config"),
               PYTHONDONTWRITEBYTECODE="1", PYDEVD_DISABLE_FILE_VALIDATION="1")
    r = subprocess.run([nbconvert, "--to", "notebook", "--execute", f"--ExecutePreprocessor.timeout={EXECUTE_TIMEOUT}",
                        "--output-dir", str(out), NOTEBOOK.name],
                       cwd=NOTEBOOK.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=EXECUTE_TIMEOUT + 120)
    assert r.returncode == 0, r.stdout.decode(errors="replace")[-6000:]

    executed = json.loads((out / NOTEBOOK.name).read_text(encoding="utf-8"))
    text, images = [], 0
    for cell in code_cells(executed):
        for o in cell["outputs"]:
            assert o["output_type"] != "error", o
            if o["output_type"] == "stream":
                text.append("".join(o["text"]))
            elif "image/png" in o.get("data", {}):
                images += 1
    text = "".join(text)
    assert f"profile {quickstart}" in text
    assert "model of round 2: validation accuracy" in text and "FINISHED" in text
    assert "best model: round" in text and "done" in text
    assert images == 1, "the accuracy and loss plots were not drawn"
    saved = list(out.glob("notebook-synthetic-mlp-*-best.safetensors"))
    assert len(saved) == 1 and saved[0].stat().st_size > 0
    assert not list(NOTEBOOK.parent.glob("*.safetensors")), "the notebook wrote into the repository"
