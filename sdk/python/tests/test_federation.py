"""End-to-end: the SDK against a real director and two real envoys."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import grpc
import numpy as np
import pytest

import fx
from conftest import SYNTH_PLAN, free_port, wait_for

# softmax over 8 features and 3 classes.
SHAPES = {"fc0.weight": (3, 8), "fc0.bias": (3,)}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def finished(cluster, fed, tmp_path_factory):
    """One experiment run to the end: (experiment, events streamed, progress calls)."""
    d = tmp_path_factory.mktemp("finished")
    (d / "plan.yaml").write_text(SYNTH_PLAN.format(name="synth-finished", rounds=3, epochs=1))
    calls = []
    exp = fed.submit(d, progress=lambda sent, total: calls.append((sent, total)))
    events = []
    deadline = time.monotonic() + 120
    for ev in exp.metrics():
        events.append(ev)
        assert time.monotonic() < deadline, "metrics still streaming after 120s"
    try:
        status = exp.wait(timeout=60)
    except fx.FXError as e:
        pytest.fail(f"{e}\n{cluster.logs()}")
    return exp, events, calls, status


def test_envoys_and_search(fed):
    envoys = {e.name: e for e in fed.envoys()}
    assert set(envoys) == {"site-1", "site-2"}
    for e in envoys.values():
        assert e.online and e.tags == ["synthetic"] and e.sample_shape == [8] and e.classes == 3
        assert e.train_samples == 300
    assert [e.name for e in fed.envoys(tags=["no-such-tag"])] == []
    assert sorted(m.envoy for m in fed.search(["synthetic"], sample_shape=[8])) == ["site-1", "site-2"]
    assert fed.search(["synthetic"], sample_shape=[28, 28]) == []
    assert fed.search("synthetic", target_shape=[]) != []
    with pytest.raises(fx.FXError) as ei:
        fed.search(["synthetic"], sample_shape=[-1])
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "negative" in str(ei.value)


def test_submit_stream_wait(finished):
    exp, events, calls, status = finished
    assert status.state == "FINISHED" and status.ended and status.rounds == 3
    assert exp.name == "synth-finished" and exp.id
    # Progress went from 0 to the archive's size.
    assert calls[0] == (0, status.archive_size) and calls[-1] == (status.archive_size, status.archive_size)
    # Every event once, in order, without gaps.
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert {e.round for e in events} >= {1, 2, 3}
    agg = [e for e in events if e.aggregate]
    assert agg and all(0 <= e.metrics["accuracy"] <= 1 for e in agg if "accuracy" in e.metrics)
    assert {e.collaborator for e in events} == {"", "site-1", "site-2"}
    assert status.best is not None and status.best["metric"] == "accuracy"
    assert {p.envoy: p.state for p in status.participants} == {"site-1": "COMPLETED", "site-2": "COMPLETED"}
    # wait() on an ended experiment answers at once.
    t0 = time.monotonic()
    assert exp.wait(timeout=5).state == "FINISHED"
    assert time.monotonic() - t0 < 5


def test_metrics_table(finished):
    _, events, _, _ = finished
    rows = fx.metrics_table(events)
    assert len(rows) == sum(len(e.metrics) for e in events)
    assert set(rows[0]) == {"round", "task", "collaborator", "metric", "value", "samples"}
    acc = fx.metric_by_round(rows, "accuracy")
    assert [r["round"] for r in acc] == sorted({e.round for e in events if e.aggregate and e.task == "aggregated_model_validation"})
    assert fx.metric_by_round(events) == acc
    assert "accuracy" in fx.format_table(rows)


def test_metrics_frame_matches_the_cli_export(cluster, fx_bin, finished, tmp_path):
    pd = pytest.importorskip("pandas", reason="metrics_frame needs pandas (Debian: python3-pandas)")
    exp, events, _, _ = finished
    df = exp.metrics_frame()
    assert df.drop(columns="time").to_dict("records") == fx.metrics_table(events)
    assert df["time"].notna().all() and str(df["time"].dt.tz) == "UTC"
    assert set(df.collaborator) == {"", "site-1", "site-2"}
    assert len(exp.metrics_frame(after=len(events))) == 0

    # `fx experiment metrics --csv` writes the same table.
    r = cluster.researcher()
    csv = tmp_path / "metrics.csv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FX_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path)  # no profile of the developer's
    out = subprocess.run([str(fx_bin), "experiment", "metrics", exp.name, "--csv", str(csv),
                          "--director", cluster.address, "--server-name", "localhost",
                          "--cert", r["cert"], "--key", r["key"], "--ca", r["ca"]],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert out.returncode == 0, out.stdout.decode(errors="replace")
    cli = pd.read_csv(csv, dtype={"collaborator": str}).fillna({"collaborator": ""})
    cli["time"] = pd.to_datetime(cli["time"], utc=True)
    assert list(cli.columns) == list(df.columns)
    pd.testing.assert_frame_equal(cli.drop(columns="time"), df.drop(columns="time"))
    # The CLI keeps the director's nanoseconds; protobuf's datetimes stop at microseconds.
    assert ((cli["time"] - df["time"]).abs() < pd.Timedelta(microseconds=1)).all()


def test_model_best_last_round(finished, tmp_path):
    exp, _, _, status = finished
    best = exp.model("best")
    assert {k: v.shape for k, v in best.items()} == SHAPES
    for v in best.values():
        assert v.dtype == np.float32 and np.isfinite(v).all()
    last = exp.model("last")
    assert {k: v.shape for k, v in last.items()} == SHAPES
    initial = exp.model(0)
    assert {k: v.shape for k, v in initial.items()} == SHAPES
    assert any(not np.array_equal(initial[k], last[k]) for k in SHAPES), "training changed nothing"
    r = status.best["round"]
    by_round = exp.model(r)
    for k in SHAPES:
        np.testing.assert_array_equal(by_round[k], best[k])
    info = exp.save_model("best", tmp_path / "best.safetensors")
    assert info.round == r and info.size == os.path.getsize(tmp_path / "best.safetensors")
    loaded = fx.load_safetensors(tmp_path / "best.safetensors")
    for k in SHAPES:
        np.testing.assert_array_equal(loaded[k], best[k])
    assert not (tmp_path / "best.safetensors.part").exists()
    with pytest.raises(fx.FXError) as ei:
        exp.model(99)
    assert ei.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(fx.FXError):
        exp.model("worst")


def test_metrics_resume_after(finished):
    exp, events, _, _ = finished
    k = len(events) // 2
    tail = list(exp.metrics(after=k))
    assert [e.sequence for e in tail] == list(range(k + 1, len(events) + 1))
    assert tail == events[k:]
    assert list(exp.metrics(after=len(events))) == []
    assert len(exp.metrics_rows()) == len(fx.metrics_table(events))
    with pytest.raises(fx.FXError):
        list(exp.metrics(after=-1))


def test_lookup_and_list(fed, finished):
    exp, _, _, _ = finished
    again = fed.experiment("synth-finished")
    assert again.id == exp.id and again.last.state == "FINISHED"
    assert fed.experiment(id=exp.id).name == "synth-finished"
    assert exp.id in {e.id for e in fed.experiments()}
    assert exp.id in {e.id for e in fed.experiments(states=["finished"])}
    assert exp.id not in {e.id for e in fed.experiments(states=["RUNNING"])}
    with pytest.raises(fx.FXError):
        fed.experiments(states=["SLEEPING"])


def test_unknown_experiment(fed):
    with pytest.raises(fx.FXError) as ei:
        fed.experiment("no-such-experiment")
    assert ei.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-experiment" in str(ei.value)


def test_submit_needs_plan_before_connecting(fed, tmp_path):
    (tmp_path / "train.py").write_text("print('hi')\n")
    with pytest.raises(fx.FXError) as ei:
        fed.submit(tmp_path)
    assert "plan.yaml" in str(ei.value) and ei.value.code is None  # refused locally
    with pytest.raises(fx.FXError) as ei:
        fed.submit(tmp_path / "missing")
    assert "does not exist" in str(ei.value)


def test_submit_invalid_plan_gets_server_message(fed, make_experiment):
    d = make_experiment("bad", plan="name: bad-plan\nrounds: 2\nparticipants: {min: 1}\nrunner: {kind: builtin, model: softmax}\nbogus_key: 1\n")
    with pytest.raises(fx.FXError) as ei:
        fed.submit(d)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bogus_key" in ei.value.details


def test_submit_twice_same_name(fed, make_experiment, finished):
    with pytest.raises(fx.FXError) as ei:
        fed.submit(make_experiment("synth-finished"))
    assert ei.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_cancel_wait_remove(fed, make_experiment):
    # No envoy carries the tag, so the experiment waits for participants.
    name = unique("never-starts")
    plan = SYNTH_PLAN.format(name=name, rounds=2, epochs=1).replace("tags: [synthetic]", "tags: [nobody-has-this]")
    exp = fed.submit(make_experiment(name, plan=plan))
    assert exp.status().state in ("PENDING", "QUEUED", "OFFERED")
    with pytest.raises(fx.FXTimeout):
        exp.wait(timeout=1)
    with pytest.raises(fx.FXError) as ei:
        exp.remove()
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
    exp.cancel("changed my mind")
    t0 = time.monotonic()
    with pytest.raises(fx.ExperimentEnded) as ei:
        exp.wait(timeout=30)
    assert ei.value.state == "CANCELLED" and "CANCELLED" in str(ei.value)
    assert time.monotonic() - t0 < 30
    with pytest.raises(fx.FXError) as ei:
        exp.cancel()
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
    exp.remove()
    with pytest.raises(fx.FXError) as ei:
        fed.experiment(name)
    assert ei.value.code == grpc.StatusCode.NOT_FOUND


def test_metrics_survive_dropped_connection(cluster, fed, proxy, make_experiment):
    """Cut the connection under a live watch: it resumes, no gaps, no repeats."""
    via = cluster.federation(proxy.address, reconnect_timeout=30)
    try:
        exp = via.submit(make_experiment(unique("dropped"), rounds=12, epochs=3))
        seen = []
        dropped_live = None
        for ev in exp.metrics():
            seen.append(ev.sequence)
            if dropped_live is None:
                proxy.blocked = True
                proxy.drop()
                # Is the experiment still going (so the watch was open)?
                dropped_live = not fed.experiment(id=exp.id).last.ended
                time.sleep(0.3)
                proxy.blocked = False
        assert seen == list(range(1, len(seen) + 1))
        st = exp.wait(timeout=60)
        assert st.state == "FINISHED"
        all_events = [e.sequence for e in fed.experiment(id=exp.id).metrics()]
        assert seen == all_events
        # 11 more rounds were to go when the first event came: the watch was
        # open when the connection was cut, so it had to reconnect.
        assert dropped_live, "the experiment ended before the connection was cut"
        assert proxy.accepted >= 2, "the watch never reconnected"
    finally:
        via.close()


def test_unreachable_director_fails_within_timeout(cluster):
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(fx.FXTimeout) as ei:
        fx.Federation(f"127.0.0.1:{port}", **cluster.researcher(timeout=1.5))
    took = time.monotonic() - t0
    assert took < 6, f"took {took:.1f}s"
    assert f"127.0.0.1:{port}" in str(ei.value) and "cannot reach" in str(ei.value)


def test_wrong_server_name_fails_clearly(cluster):
    t0 = time.monotonic()
    with pytest.raises(fx.FXTimeout) as ei:
        cluster.federation(server_name="not-the-director", timeout=1.5)
    assert time.monotonic() - t0 < 6
    assert "server_name" in str(ei.value)


def test_missing_credentials(cluster, tmp_path):
    with pytest.raises(fx.FXError) as ei:
        fx.Federation(cluster.address, ca=str(tmp_path / "nope.crt"), cert="x", key="y")
    assert "nope.crt" in str(ei.value)
    with pytest.raises(fx.FXError):
        fx.Federation("no-port", **cluster.researcher())


def test_default_server_name_is_the_host(cluster):
    # The director's certificate carries 127.0.0.1 as a SAN.
    with fx.Federation(cluster.address, **cluster.researcher()) as f:
        assert {e.name for e in f.envoys()} == {"site-1", "site-2"}


def test_wait_survives_dropped_connection(cluster, proxy, make_experiment):
    via = cluster.federation(proxy.address, reconnect_timeout=30)
    try:
        exp = via.submit(make_experiment(unique("wait-dropped"), rounds=8, epochs=3))
        events = []

        def cut(ev):
            events.append(ev.sequence)
            if len(events) == 1:
                proxy.blocked = True
                proxy.drop()
                time.sleep(0.3)
                proxy.blocked = False

        st = exp.wait(timeout=90, on_event=cut)
        assert st.state == "FINISHED"
        assert events == list(range(1, len(events) + 1)) and len(events) > 1
        assert proxy.accepted >= 2
    finally:
        via.close()


def test_director_from_another_federation(cluster, other_pki):
    # Our trust root does not vouch for the director's certificate.
    with pytest.raises(fx.FXTimeout) as ei:
        cluster.federation(ca=str(other_pki / "researcher" / "ca.crt"), timeout=1.5)
    assert "certificate verify failed" in str(ei.value)


def test_researcher_from_another_federation(cluster, other_pki):
    # The director does not know our CA: it refuses the handshake.
    r = other_pki / "researcher"
    with pytest.raises(fx.FXTimeout) as ei:
        cluster.federation(cert=str(r / "researcher.crt"), key=str(r / "researcher.key"), timeout=1.5)
    assert cluster.address in str(ei.value)


def test_wrong_role(cluster):
    e = cluster.pki / "envoys" / "site-1"
    with cluster.federation(cert=str(e / "site-1.crt"), key=str(e / "site-1.key")) as as_envoy:
        with pytest.raises(fx.FXError) as ei:
            as_envoy.experiments()
    assert ei.value.code == grpc.StatusCode.PERMISSION_DENIED and "envoy" in ei.value.details


def test_director_and_envoys_accept_the_python_archive(fed, make_experiment):
    """Nested and empty directories, an executable, a non-ASCII name and a
    name over tar's 100 bytes (a PAX header): the director validates the
    archive, the envoys unpack it, and the experiment runs."""
    name = unique("layout")
    d = make_experiment(name)
    (d / "src" / "pkg").mkdir(parents=True)
    (d / "src" / "pkg" / "model.py").write_text("W = 1\n")
    (d / "empty").mkdir()
    (d / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(d / "run.sh", 0o755)
    (d / "données-é.txt").write_text("é\n")
    (d / ("x" * 150 + ".txt")).write_text("long\n")
    arc = fx.pack(d)
    exp = fed.submit(d)
    assert exp.last.archive_sha256 == arc.sha256 and exp.last.archive_size == arc.size
    assert exp.wait(timeout=120).state == "FINISHED"


SITE_SCRIPT = """\
import numpy as np
from fx import site

data = site.data()
x, y = np.asarray(data.train.x, dtype=np.float64), data.train.y
print(f"site data: {len(data.train)} training samples of {data.sample_shape}, {data.classes} classes", flush=True)
for task in site.tasks():
    m = task.model()
    w, b = m["fc0.weight"].astype(np.float64), m["fc0.bias"].astype(np.float64)
    if task.train:
        for _ in range(20):  # full-batch gradient descent on softmax regression
            z = x @ w.T + b
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(y)), y] -= 1
            w -= 0.5 * p.T @ x / len(y)
            b -= 0.5 * p.mean(axis=0)
        print(f"round {task.round}: trained", flush=True)
        task.send({"fc0.weight": w, "fc0.bias": b}, samples=len(y))
    else:
        xv, yv = np.asarray(data.valid.x, dtype=np.float64), data.valid.y
        acc = float(((xv @ w.T + b).argmax(axis=1) == yv).mean())
        task.send(samples=len(yv), metrics={"accuracy": acc})
"""


def test_site_library_through_the_federation(fed, tmp_path):
    """A script on fx.site runs at both sites as a persistent exec runner;
    the researcher reads the output of the site that shares it."""
    from fx import site

    d = tmp_path / "site-exp"
    d.mkdir()
    name = unique("site-lib")
    (d / "plan.yaml").write_text(f"""\
name: {name}
rounds: 3
participants: {{min: 2}}
runner: {{kind: exec, command: [python3, train.py], timeout: 2m}}
stragglers: {{deadline: 2m, min_reporting: 2}}
""")
    (d / "train.py").write_text(SITE_SCRIPT)
    site.save_model({"fc0.weight": np.zeros(SHAPES["fc0.weight"], np.float32), "fc0.bias": np.zeros(3, np.float32)}, d / "model.safetensors")
    exp = fed.submit(d)
    status = exp.wait(timeout=180)
    assert status.state == "FINISHED"
    assert status.best["metric"] == "accuracy" and status.best["value"] > 0.6, status.best
    # Sites send what their runners print every second or so: the last
    # lines may arrive just after the experiment ends.
    def through_round_3():
        got = list(exp.logs())
        return got if any(line.text == "round 3: trained" for line in got) else None

    lines = wait_for(through_round_3, 60, "site-1's runner output up to round 3")
    texts = [l.text for l in lines]
    assert {l.envoy for l in lines} == {"site-1"}, lines
    assert "site data: 300 training samples of (8,), 3 classes" in texts
    assert any(l.task == "train" and l.round == 1 and l.text == "round 1: trained" for l in lines), texts
    assert [l.text for l in exp.logs(envoy="site-2")] == []


def test_evaluation_of_the_last_model(fed, finished, make_experiment):
    exp, events, _, _ = finished
    with pytest.raises(fx.FXError, match="not an evaluation"):
        exp.evaluation()
    plan = SYNTH_PLAN.format(name="synth-eval", rounds=1, epochs=1) + "tasks: [aggregated_model_validation]\n"
    d = make_experiment("synth-eval", plan=plan)
    exp.save_model("last", d / "model.safetensors")
    ev = fed.submit(d)
    ev.wait(timeout=120)
    result = ev.evaluation()
    assert sorted(result.sites) == ["site-1", "site-2"]
    total = sum(s.samples for s in result.sites.values())
    mean = sum(s.samples * s.metrics["accuracy"] for s in result.sites.values()) / total
    assert result.overall.samples == total
    assert result.overall.metrics["accuracy"] == pytest.approx(mean, abs=1e-12)
    # The same sites scored the same model in the training's final validation.
    final = [e for e in events if e.round == 4 and e.task == "aggregated_model_validation" and not e.aggregate]
    assert {e.collaborator: e.metrics["accuracy"] for e in final} == pytest.approx(
        {n: s.metrics["accuracy"] for n, s in result.sites.items()}, abs=1e-12)
