"""Listings longer than a page, and requests over the protocol's limits (a
federation of its own, so its 105 waiting experiments hold up no one)."""

from __future__ import annotations

import grpc
import pytest

import fx
from conftest import start_cluster

# Selects no site: the experiment waits, offered or queued, without work
# for the envoys.
IDLE_PLAN = """\
name: {name}
rounds: 1
participants: {{min: 1, tags: [nowhere]}}
runner: {{kind: builtin, model: softmax}}
"""


def test_lists_read_every_page(workdir, fx_bin, pki, tmp_path):
    c = start_cluster(workdir / "pages", pki, fx_bin)
    fed = None
    try:
        fed = c.federation()
        n = 105  # the director's pages hold 100
        names = []
        for i in range(n):
            d = tmp_path / f"exp{i}"
            d.mkdir()
            (d / "plan.yaml").write_text(IDLE_PLAN.format(name=f"idle-{i:03d}"))
            names.append(fed.submit(d).name)
        listed = [e.name for e in fed.experiments()]
        assert listed == names[::-1], f"listed {len(listed)} experiments, want all {n} newest first"
        assert len(fed.experiments(states=["OFFERED", "QUEUED"])) == n
        assert [e.name for e in fed.envoys()] == ["site-1", "site-2"]
        assert [m.envoy for m in fed.search(["synthetic"])] == ["site-1", "site-2"]

        exp = fed.experiment("idle-000")
        with pytest.raises(fx.FXError) as ei:
            exp.cancel("x" * 5000)
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "reason: must be at most 4096 bytes" in str(ei.value)
        assert exp.cancel("x" * 4096).state == "CANCELLED"
    finally:
        if fed is not None:
            fed.close()
        c.stop()
