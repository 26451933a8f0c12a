"""A director restart under a live watch (its own federation, fixed port)."""

from __future__ import annotations

from conftest import SYNTH_PLAN, free_port, start_cluster


def test_watch_and_wait_survive_director_restart(workdir, fx_bin, pki, tmp_path):
    c = start_cluster(workdir / "restart", pki, fx_bin, listen=f"127.0.0.1:{free_port()}")
    fed = None
    try:
        fed = c.federation(reconnect_timeout=60)
        d = tmp_path / "exp"
        d.mkdir()
        rounds = 40
        (d / "plan.yaml").write_text(SYNTH_PLAN.format(name="restart", rounds=rounds, epochs=3))
        exp = fed.submit(d)
        seen = []
        round_at_restart = None
        for ev in exp.metrics():
            seen.append(ev.sequence)
            if round_at_restart is None and ev.round >= 2:
                round_at_restart = ev.round
                c.stop_director(kill=True)  # a crash: the watch's connection breaks
                assert c.start_director() == c.address
                after = fed.experiment(id=exp.id).last
        assert round_at_restart is not None
        # Still running after the restart: the watch had to carry on across it.
        assert after.state == "RUNNING" and after.round < rounds, after
        assert seen == list(range(1, len(seen) + 1)), "gaps or repeats across the restart"
        st = exp.wait(timeout=120)
        assert st.state == "FINISHED", f"{st.state}: {st.reason}\n{c.logs()}"
        full = [ev.sequence for ev in exp.metrics()]
        assert seen == full
        rounds_seen = {ev.round for ev in exp.metrics(follow=False)}
        assert rounds_seen >= set(range(1, rounds + 1))
        assert {k: v.shape for k, v in exp.model("best").items()} == {"fc0.weight": (3, 8), "fc0.bias": (3,)}
    finally:
        if fed is not None:
            fed.close()
        c.stop()
