"""Metric events and tables of them."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union


@dataclass(frozen=True)
class MetricEvent:
    """One collaborator's task result, or (collaborator "") a round's aggregate."""

    sequence: int
    round: int
    task: str
    collaborator: str
    samples: int
    metrics: Dict[str, float] = field(default_factory=dict)
    time: Optional[_dt.datetime] = None

    @property
    def aggregate(self) -> bool:
        """True for a round's aggregate over its collaborators."""
        return self.collaborator == ""

    @classmethod
    def from_proto(cls, ev: Any) -> "MetricEvent":
        t = None
        if ev.HasField("time"):
            t = ev.time.ToDatetime(tzinfo=_dt.timezone.utc)
        return cls(
            sequence=ev.sequence,
            round=ev.round,
            task=ev.task,
            collaborator=ev.collaborator,
            samples=ev.samples,
            metrics=dict(sorted(ev.metrics.items())),
            time=t,
        )


Event = Union[MetricEvent, Mapping[str, Any], Any]


def _fields(ev: Event) -> MetricEvent:
    if isinstance(ev, MetricEvent):
        return ev
    if isinstance(ev, Mapping):
        return MetricEvent(
            sequence=int(ev.get("sequence", 0)),
            round=int(ev["round"]),
            task=ev.get("task", ""),
            collaborator=ev.get("collaborator", ""),
            samples=int(ev.get("samples", 0)),
            metrics=dict(ev.get("metrics", {})),
            time=ev.get("time"),
        )
    return MetricEvent.from_proto(ev)  # a fx.v1.MetricEvent message


def metrics_table(events: Iterable[Event]) -> List[Dict[str, Any]]:
    """Flattens metric events into rows, one per metric of each event.

    Each row is {"round", "task", "collaborator", "metric", "value",
    "samples"}; collaborator is "" for a round's aggregate. The rows are
    ready for ``pandas.DataFrame(rows)``, or for :func:`metric_by_round`.
    """
    rows = []
    for ev in events:
        e = _fields(ev)
        for name, value in sorted(e.metrics.items()):
            rows.append(
                {
                    "round": e.round,
                    "task": e.task,
                    "collaborator": e.collaborator,
                    "metric": name,
                    "value": float(value),
                    "samples": e.samples,
                }
            )
    return rows


# The columns of metrics_frame, which `fx experiment metrics --csv` and
# `--json` write too.
FRAME_COLUMNS = ["round", "task", "collaborator", "metric", "value", "samples", "time"]


def metrics_frame(events: Iterable[Event]) -> Any:
    """The events as a pandas DataFrame, one row per metric of each event.

    Its columns are those of ``fx experiment metrics --csv``: round, task,
    collaborator ("" for a round's aggregate), metric, value, samples and
    time (when the director recorded the result, a UTC timestamp; NaT for
    events that carry none, such as plain dicts). Rows stay in the order
    of the events. Takes what :func:`metrics_table` takes.

    pandas is imported here, not with fx: without it this raises an
    ImportError that says how to install it, and :func:`metrics_table`
    gives the same rows as dicts.
    """
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(
            "fx.metrics_frame needs pandas, which this Python cannot import "
            "(Debian: apt install python3-pandas; elsewhere: pip install pandas); "
            "without it, fx.metrics_table() and Experiment.metrics_rows() give the same rows as dicts"
        ) from e
    records = []
    for ev in events:
        e = _fields(ev)
        for name, value in sorted(e.metrics.items()):
            records.append((e.round, e.task, e.collaborator, name, float(value), e.samples, e.time))
    df = pd.DataFrame.from_records(records, columns=FRAME_COLUMNS)
    df = df.astype({"round": "int64", "task": "object", "collaborator": "object", "metric": "object",
                    "value": "float64", "samples": "int64"})
    df["time"] = pd.to_datetime(df["time"], utc=True)
    return df


# The task whose aggregate best shows the global model's quality.
DEFAULT_TASK = "aggregated_model_validation"


def metric_by_round(
    rows_or_events: Iterable[Any], metric: str = "accuracy", task: Optional[str] = None
) -> List[Dict[str, Any]]:
    """The aggregate value of one metric per round: [{"round", "value"}, ...].

    Takes rows from :func:`metrics_table` or events. ``task`` defaults to
    aggregated_model_validation when present, else the first task that
    reports the metric. Collaborators' own rows are left out.
    """
    items = list(rows_or_events)
    if items and not (isinstance(items[0], Mapping) and "metric" in items[0]):
        items = metrics_table(items)
    agg = [r for r in items if r["collaborator"] == "" and r["metric"] == metric]
    if task is None:
        tasks = [r["task"] for r in agg]
        task = DEFAULT_TASK if DEFAULT_TASK in tasks else (tasks[0] if tasks else None)
    by_round: Dict[int, float] = {}
    for r in agg:
        if r["task"] == task:
            by_round[r["round"]] = r["value"]
    return [{"round": k, "value": by_round[k]} for k in sorted(by_round)]


def format_table(rows: List[Mapping[str, Any]], columns: Optional[List[str]] = None) -> str:
    """Renders rows as a plain-text table (for when pandas is not at hand)."""
    if not rows:
        return "(no rows)"
    cols = columns or list(rows[0].keys())

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    table = [[c for c in cols]] + [[cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
