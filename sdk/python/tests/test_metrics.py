"""Metric tables."""

import sys

import pytest

import fx
from fx._proto.fx.v1 import director_pb2 as pb


def events():
    return [
        fx.MetricEvent(1, 1, "aggregated_model_validation", "site-1", 60, {"accuracy": 0.5, "loss": 1.0}),
        fx.MetricEvent(2, 1, "train", "site-1", 300, {"loss": 0.4}),
        fx.MetricEvent(3, 1, "aggregated_model_validation", "", 120, {"accuracy": 0.55, "loss": 0.9}),
        fx.MetricEvent(4, 1, "train", "", 600, {"loss": 0.45}),
        fx.MetricEvent(5, 2, "aggregated_model_validation", "", 120, {"accuracy": 0.8}),
    ]


def test_metrics_table_rows():
    rows = fx.metrics_table(events())
    assert rows[0] == {"round": 1, "task": "aggregated_model_validation", "collaborator": "site-1",
                       "metric": "accuracy", "value": 0.5, "samples": 60}
    assert len(rows) == 7
    assert all(isinstance(r["value"], float) for r in rows)


def test_metric_by_round():
    assert fx.metric_by_round(events()) == [{"round": 1, "value": 0.55}, {"round": 2, "value": 0.8}]
    assert fx.metric_by_round(fx.metrics_table(events()), "loss", task="train") == [{"round": 1, "value": 0.45}]
    assert fx.metric_by_round([]) == []


def test_from_proto_and_dicts():
    ev = pb.MetricEvent(sequence=3, round=2, task="train", collaborator="", samples=10, metrics={"loss": 0.25})
    ev.time.FromSeconds(1700000000)
    m = fx.MetricEvent.from_proto(ev)
    assert m.aggregate and m.metrics == {"loss": 0.25} and m.time.year == 2023
    assert fx.metrics_table([ev]) == fx.metrics_table([m])
    assert fx.metrics_table([{"round": 2, "task": "train", "collaborator": "", "samples": 10, "metrics": {"loss": 0.25}}]) == fx.metrics_table([m])


def test_format_table():
    out = fx.format_table(fx.metrics_table(events()))
    assert out.splitlines()[0].split() == ["round", "task", "collaborator", "metric", "value", "samples"]
    assert "0.5500" in out
    assert fx.format_table([]) == "(no rows)"


def test_metrics_frame():
    pd = pytest.importorskip("pandas", reason="metrics_frame needs pandas (Debian: python3-pandas)")
    ev = pb.MetricEvent(sequence=6, round=2, task="train", collaborator="site-2", samples=7, metrics={"loss": 0.5, "accuracy": 0.75})
    ev.time.FromSeconds(1700000000)
    df = fx.metrics_frame(events() + [ev])
    assert list(df.columns) == ["round", "task", "collaborator", "metric", "value", "samples", "time"]
    # The rows of metrics_table, in order, and the time where the event has one.
    rows = fx.metrics_table(events() + [ev])
    assert df.drop(columns="time").to_dict("records") == rows
    assert str(df["round"].dtype) == "int64" and str(df["samples"].dtype) == "int64" and str(df["value"].dtype) == "float64"
    assert df["time"].isna().sum() == len(rows) - 2
    assert list(df["time"].iloc[-2:]) == [pd.Timestamp(1700000000, unit="s", tz="UTC")] * 2
    agg = df[(df.collaborator == "") & (df.metric == "accuracy")]
    assert agg.pivot(index="round", columns="task", values="value").loc[1, "aggregated_model_validation"] == 0.55
    empty = fx.metrics_frame([])
    assert list(empty.columns) == list(df.columns) and len(empty) == 0


def test_metrics_frame_without_pandas(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError) as ei:
        fx.metrics_frame(events())
    msg = str(ei.value)
    assert "pandas" in msg and "python3-pandas" in msg and "metrics_table" in msg
