"""The researcher's client of an fx director: Federation and Experiment."""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import grpc
import numpy as np

from . import archive as _archive
from . import profile as _profile
from .errors import ExperimentEnded, FXError, FXTimeout, from_rpc
from .metrics import MetricEvent, metrics_frame, metrics_table
from .safetensors import read_safetensors
from ._proto.fx.v1 import director_pb2 as pb
from ._proto.fx.v1 import director_pb2_grpc as pb_grpc

# States after which nothing changes.
ENDED_STATES = ("FINISHED", "FAILED", "CANCELLED", "REJECTED")

# Stream errors after which a watch is worth opening again.
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,  # a connection reset mid-stream
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


_DIRECTOR_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": "fx.v1.Director"}}
)


def _director_target(director: str) -> str:
    """The gRPC target for a director address: host:port, a dns:/// target
    with a record per director, or, for active and standby directors,
    their IP:port entries separated by commas (gRPC's ipv4:/ipv6: lists).
    Host names cannot be listed here: give one DNS name instead."""
    if director.startswith("dns:"):
        return director
    parts = [p.strip() for p in director.split(",")]
    if not director or any(":" not in p for p in parts):
        raise FXError(f"director {director!r} is not host:port (or several, separated by commas)")
    if len(parts) == 1:
        return parts[0]
    hosts = [p.rsplit(":", 1)[0] for p in parts]
    try:
        families = {ipaddress.ip_address(h.strip("[]")).version for h in hosts}
    except ValueError:
        raise FXError(
            f"director {director!r}: several directors can be listed by IP address only here; "
            "for host names give one DNS name with a record per director (dns:///name:port)"
        ) from None
    if len(families) != 1:
        raise FXError(f"director {director!r}: list IPv4 or IPv6 addresses, not both")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(parts)


def _ts(t: Any) -> Optional[_dt.datetime]:
    if t is None or (t.seconds == 0 and t.nanos == 0):
        return None
    return t.ToDatetime(tzinfo=_dt.timezone.utc)


def _read(path: Union[str, os.PathLike], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FXError(f"cannot read the {what} {os.fspath(path)}: {e.strerror or e}") from None


# ------------------------------------------------------------------ records


@dataclass
class Participant:
    envoy: str
    state: str
    reason: str
    last_round: int
    task: str
    updated_at: Optional[_dt.datetime]


@dataclass
class ExperimentStatus:
    """The director's record of an experiment (``proto`` holds the message)."""

    id: str
    name: str
    owner: str
    state: str
    reason: str
    round: int
    rounds: int
    participants: List[Participant]
    best: Optional[Dict[str, Any]]
    latest_metrics: Dict[str, float]
    created_at: Optional[_dt.datetime]
    updated_at: Optional[_dt.datetime]
    archive_size: int
    archive_sha256: str
    plan_yaml: str = field(repr=False)
    proto: Any = field(repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @classmethod
    def from_proto(cls, e: Any) -> "ExperimentStatus":
        best = None
        if e.HasField("best"):
            best = {"round": e.best.round, "metric": e.best.metric, "value": e.best.value}
        return cls(
            id=e.id,
            name=e.name,
            owner=e.owner,
            state=pb.ExperimentState.Name(e.state),
            reason=e.reason,
            round=e.round,
            rounds=e.rounds,
            participants=[
                Participant(
                    envoy=p.envoy,
                    state=pb.ParticipantState.Name(p.state),
                    reason=p.reason,
                    last_round=p.last_round,
                    task=p.task,
                    updated_at=_ts(p.updated_at),
                )
                for p in e.participants
            ],
            best=best,
            latest_metrics=dict(sorted(e.latest_metrics.items())),
            created_at=_ts(e.created_at),
            updated_at=_ts(e.updated_at),
            archive_size=e.archive_size,
            archive_sha256=e.archive_sha256,
            plan_yaml=e.plan_yaml,
            proto=e,
        )


@dataclass
class EnvoyInfo:
    """One envoy as the director sees it, with its dataset shard."""

    name: str
    online: bool
    last_seen: Optional[_dt.datetime]
    description: str
    tags: List[str]
    sample_shape: List[int]
    target_shape: List[int]
    train_samples: int
    valid_samples: int
    classes: int
    max_experiments: int
    experiments: List[str]
    version: str


@dataclass
class DatasetMatch:
    """A shard that matches a search, and where it is."""

    envoy: str
    online: bool
    description: str
    tags: List[str]
    sample_shape: List[int]
    target_shape: List[int]
    train_samples: int
    valid_samples: int
    classes: int


@dataclass
class ModelInfo:
    """What DownloadModel says about the model file it sends."""

    round: int
    size: int
    sha256: str
    metrics: Dict[str, float]


# ------------------------------------------------------------------ client


class Federation:
    """A connection to a director, as a researcher (or an admin).

    ``director`` is "host:port"; ``ca`` the federation root certificate;
    ``cert`` and ``key`` the caller's certificate (followed by its signing CA)
    and private key, as scripts/pki-bootstrap.sh writes them. ``server_name``
    is the name the director's certificate must carry when it differs from
    the host of ``director``. The constructor waits at most ``timeout``
    seconds for the director, and every unary call is bounded by ``timeout``.
    Watches survive dropped connections for up to ``reconnect_timeout``
    seconds without progress.
    """

    def __init__(
        self,
        director: str,
        ca: Union[str, os.PathLike],
        cert: Union[str, os.PathLike],
        key: Union[str, os.PathLike],
        server_name: Optional[str] = None,
        timeout: float = 10,
        reconnect_timeout: float = 60,
    ):
        target = _director_target(director)
        self.director = director
        self.timeout = float(timeout)
        self.reconnect_timeout = float(reconnect_timeout)
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(ca, "CA certificate"),
            private_key=_read(key, "private key"),
            certificate_chain=_read(cert, "certificate"),
        )
        options = [
            # Come back quickly after a director restart.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
            # With several directors (active and standby) call the one
            # whose health service says it serves: the leader.
            ("grpc.service_config", _DIRECTOR_SERVICE_CONFIG),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = grpc.secure_channel(target, creds, options=options)
        self._stub = pb_grpc.DirectorStub(self._channel)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.timeout)
        except grpc.FutureTimeoutError:
            why = self._probe()
            self._channel.close()
            raise FXTimeout(
                f"cannot reach the director at {director} within {self.timeout:g}s"
                + (f": {why}" if why else "")
                + " (is it running there? do ca, cert, key and server_name match the federation's certificates?)",
                code=grpc.StatusCode.UNAVAILABLE,
                details=why,
            ) from None

    @classmethod
    def from_profile(cls, path: Optional[Union[str, os.PathLike]] = None, **kwargs: Any) -> "Federation":
        """Connects with the settings the fx CLI would use: the profile file
        ``path``, else ``$FX_PROFILE``, else ``~/.config/fx/config.yaml`` if
        it exists, with ``FX_*`` variables over it (see :mod:`fx.profile`).
        ``fx quickstart --keep-running`` writes ``fx-quickstart/profile.yaml``
        for its federation. ``kwargs`` go to the constructor
        (``reconnect_timeout``, or any setting to override).
        """
        p = _profile.load_profile(path)
        settings = dict(director=p.director, ca=p.ca, cert=p.cert, key=p.key, server_name=p.server_name, timeout=p.timeout)
        settings.update(kwargs)
        if p.path is None and not any(os.path.exists(settings[k]) for k in ("ca", "cert", "key")):
            raise FXError(
                f"no profile: {_profile.PROFILE_ENV} is not set and {_profile.default_profile_path()} does not exist, "
                f"and the default certificate {settings['cert']} is not here either: name the profile, "
                "e.g. fx.Federation.from_profile('fx-quickstart/profile.yaml'), which fx quickstart --keep-running writes"
            )
        return cls(**settings)

    def _probe(self) -> str:
        """The channel's last connection error, if a quick call reveals it."""
        try:
            self._stub.ListEnvoys(pb.ListEnvoysRequest(), timeout=1)
        except grpc.RpcError as e:
            return e.details() or ""
        return ""

    # -- plumbing

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Federation({self.director!r})"

    def _await_channel(self, at_most: float) -> None:
        """Waits until the channel is ready again, or for about at_most seconds."""
        wait = at_most * (0.5 + random.random())
        t0 = time.monotonic()
        try:
            grpc.channel_ready_future(self._channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            return
        # Ready at once: still pause a little, so a server that fails every
        # call is not called in a hot loop.
        pause = min(0.2, wait) - (time.monotonic() - t0)
        if pause > 0:
            time.sleep(pause)

    def _unary(self, method: str, request: Any, what: str, timeout: Optional[float] = None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise from_rpc(e, what) from None

    def _pages(self, method: str, request: Any, field: str, what: str) -> List[Any]:
        """Every item of a listing: the director answers a page at a time
        (next_page_token names the next), each call bounded as any other."""
        items: List[Any] = []
        token = ""
        while True:
            request.page_token = token
            resp = self._unary(method, request, what)
            items.extend(getattr(resp, field))
            if not resp.next_page_token:
                return items
            if resp.next_page_token == token:
                raise FXError(f"{what}: the director handed out the same page token twice")
            token = resp.next_page_token

    # -- envoys and data

    def envoys(self, tags: Optional[Sequence[str]] = None, online_only: bool = False) -> List[EnvoyInfo]:
        """The registered envoys (those whose shard carries every tag given)."""
        envoys = self._pages(
            "ListEnvoys", pb.ListEnvoysRequest(tags=list(tags or []), online_only=online_only), "envoys", "listing envoys"
        )
        out = []
        for e in envoys:
            s = e.shard
            out.append(
                EnvoyInfo(
                    name=e.name,
                    online=e.online,
                    last_seen=_ts(e.last_seen),
                    description=s.description,
                    tags=list(s.tags),
                    sample_shape=list(s.sample_shape),
                    target_shape=list(s.target_shape),
                    train_samples=s.train_samples,
                    valid_samples=s.valid_samples,
                    classes=s.classes,
                    max_experiments=e.max_experiments,
                    experiments=list(e.experiments),
                    version=e.version,
                )
            )
        return out

    def search(
        self,
        tags: Optional[Sequence[str]] = None,
        sample_shape: Optional[Sequence[int]] = None,
        target_shape: Optional[Sequence[int]] = None,
        include_offline: bool = False,
    ) -> List[DatasetMatch]:
        """Shards that carry every tag and, when given, these shapes."""
        if isinstance(tags, str):
            tags = [tags]
        req = pb.SearchDatasetsRequest(
            tags=list(tags or []),
            sample_shape=list(sample_shape or []),
            target_shape=list(target_shape or []),
            include_offline=include_offline,
        )
        matches = self._pages("SearchDatasets", req, "matches", "searching datasets")
        return [
            DatasetMatch(
                envoy=m.envoy,
                online=m.online,
                description=m.shard.description,
                tags=list(m.shard.tags),
                sample_shape=list(m.shard.sample_shape),
                target_shape=list(m.shard.target_shape),
                train_samples=m.shard.train_samples,
                valid_samples=m.shard.valid_samples,
                classes=m.shard.classes,
            )
            for m in matches
        ]

    # -- experiments

    def submit(
        self,
        path: Union[str, os.PathLike],
        name: Optional[str] = None,
        progress: Optional[Callable[[int, int], None]] = None,
        timeout: Optional[float] = None,
    ) -> "Experiment":
        """Packs and uploads an experiment; returns it (PENDING or beyond).

        ``path`` is a directory with plan.yaml at its root (packed here into a
        deterministic tar.gz) or an existing .tar.gz/.zip archive. ``name``
        overrides the plan's name. ``progress(sent, total)`` is called after
        every chunk. ``timeout`` bounds the upload (default: the client's
        timeout plus a second per MiB).
        """
        arc = _archive.load(path)
        try:
            total = arc.size
            if timeout is None:
                timeout = self.timeout + total / (1024 * 1024) + 10

            def requests() -> Iterator[Any]:
                yield pb.SubmitExperimentRequest(
                    header=pb.SubmitHeader(name=name or "", size=total, sha256=arc.sha256, plan_yaml=arc.plan_yaml)
                )
                sent = 0
                if progress:
                    progress(0, total)
                for chunk in arc.chunks():
                    yield pb.SubmitExperimentRequest(chunk=chunk)
                    sent += len(chunk)
                    if progress:
                        progress(sent, total)

            try:
                resp = self._stub.SubmitExperiment(requests(), timeout=timeout, wait_for_ready=True)
            except grpc.RpcError as e:
                raise from_rpc(e, f"submitting {os.fspath(path)}") from None
        finally:
            arc.close()
        return Experiment(self, resp.experiment)

    def experiment(self, name: Optional[str] = None, *, id: Optional[str] = None, owner: Optional[str] = None) -> "Experiment":
        """One experiment, by name (the caller's own, or ``owner``'s for an admin) or by id."""
        if not name and not id:
            raise FXError("give an experiment name or id")
        ref = pb.ExperimentRef(id=id or "", name=name or "", owner=owner or "")
        e = self._unary("GetExperiment", pb.GetExperimentRequest(experiment=ref), f"experiment {id or name}")
        return Experiment(self, e)

    def experiments(self, states: Optional[Sequence[str]] = None, owner: Optional[str] = None) -> List["Experiment"]:
        """The caller's experiments (an admin's: everyone's, or owner's), newest first."""
        try:
            st = [pb.ExperimentState.Value(s.upper()) for s in (states or [])]
        except ValueError:
            raise FXError(f"unknown state in {list(states or [])}: want some of {', '.join(ENDED_STATES + ('PENDING', 'QUEUED', 'OFFERED', 'RUNNING', 'PAUSED'))}") from None
        exps = self._pages(
            "ListExperiments", pb.ListExperimentsRequest(states=st, owner=owner or ""), "experiments", "listing experiments"
        )
        return [Experiment(self, e) for e in exps]


@dataclass
class RunnerLogLine:
    """One line an experiment's runner printed at a site that shares its runners' output."""

    sequence: int
    envoy: str
    time: _dt.datetime
    task: str
    round: int
    stream: str  # stdout, stderr, or fx (the site's note of lines over its rate limit)
    text: str

    @classmethod
    def from_proto(cls, m: Any) -> "RunnerLogLine":
        return cls(m.sequence, m.envoy, m.time.ToDatetime(tzinfo=_dt.timezone.utc), m.task, m.round, m.stream, m.text)

    def __str__(self) -> str:
        where = f"{self.task} r{self.round}" if self.task else "-"
        return f"{self.time:%H:%M:%S}  {self.envoy}  {where}  {self.stream}: {self.text}"


@dataclass
class Evaluation:
    """What an evaluation (a plan whose tasks are only aggregated_model_validation) found: each
    site's score of the given model, by envoy, and the overall score, the sites' mean weighted by
    their validation samples (None if no site reported)."""

    sites: Dict[str, MetricEvent]
    overall: Optional[MetricEvent]


class Experiment:
    """An experiment at the director. ``last`` is the status last fetched."""

    def __init__(self, fed: Federation, proto: Any):
        self._fed = fed
        self.id: str = proto.id
        self.name: str = proto.name
        self.owner: str = proto.owner
        self.last = ExperimentStatus.from_proto(proto)

    def __repr__(self) -> str:
        s = self.last
        return f"<Experiment {self.name} id={self.id} {s.state} round {s.round}/{s.rounds}>"

    def _ref(self) -> Any:
        return pb.ExperimentRef(id=self.id)

    # -- state

    def status(self) -> ExperimentStatus:
        """Fetches the experiment's record: state, round, participants, best model."""
        e = self._fed._unary("GetExperiment", pb.GetExperimentRequest(experiment=self._ref()), f"experiment {self.name}")
        self.last = ExperimentStatus.from_proto(e)
        return self.last

    @property
    def state(self) -> str:
        return self.status().state

    # -- metrics

    def metrics(self, after: int = 0, follow: bool = True) -> Iterator[MetricEvent]:
        """Yields metric events in sequence order, starting after ``after``.

        With ``follow`` (the default) it waits for new events while the
        experiment is live and ends after the last event of an ended
        experiment; without it, it stops once the events so far are read.
        A dropped connection is reopened with backoff from the last
        sequence yielded, so no event is lost or repeated; it gives up (with
        FXError) after the federation's reconnect_timeout without progress.
        """
        if after < 0:
            raise FXError(f"after={after}: give 0 for every event, or the last sequence seen")
        idle = None
        if not follow and not self.status().ended:
            idle = 2.0
        yield from self._watch(after, idle)

    def evaluation(self) -> Evaluation:
        """The results of an evaluation that has ended (see docs/experiments.md, "Evaluating a
        trained model"); the same events ``metrics()`` yields, picked out."""
        if not self.status().ended:
            raise FXError(f"experiment {self.name} is {self.last.state}: its evaluation is known once it has ended")
        sites: Dict[str, MetricEvent] = {}
        overall = None
        for ev in self.metrics(follow=False):
            if ev.round != 1 or ev.task != "aggregated_model_validation":
                raise FXError(
                    f"experiment {self.name} is not an evaluation (it reported {ev.task} in round {ev.round}): "
                    "metrics_frame() holds its validations"
                )
            if ev.aggregate:
                overall = ev
            else:
                sites[ev.collaborator] = ev
        return Evaluation(dict(sorted(sites.items())), overall)

    def _watch(self, after: int, idle: Optional[float]) -> Iterator[MetricEvent]:
        """WatchMetrics from after, reopened after failures. With idle, a call
        lasts at most idle seconds and the watch stops after one that brought
        no event."""
        fed = self._fed
        last = after
        backoff = 0.2
        failing_since: Optional[float] = None
        while True:
            call = fed._stub.WatchMetrics(pb.WatchMetricsRequest(experiment=self._ref(), after_sequence=last), timeout=idle)
            got = False
            try:
                for ev in call:
                    if ev.sequence <= last:
                        continue  # never repeat an event
                    last = ev.sequence
                    got = True
                    failing_since = None
                    backoff = 0.2
                    yield MetricEvent.from_proto(ev)
                return  # the experiment ended and every event was sent
            except grpc.RpcError as e:
                code = e.code()
                if idle is not None and code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    if got:
                        continue
                    return
                if code not in _RETRYABLE:
                    raise from_rpc(e, f"watching the metrics of {self.name}") from None
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                elif now - failing_since > fed.reconnect_timeout:
                    raise from_rpc(
                        e,
                        f"watching the metrics of {self.name}: gave up after {fed.reconnect_timeout:g}s "
                        f"of failures (resume with after={last})",
                    ) from None
                fed._await_channel(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                call.cancel()

    # -- runner output

    def logs(self, envoy: str = "", follow: bool = False) -> Iterator["RunnerLogLine"]:
        """Yields what the experiment's runners printed at the sites that share it
        (their ``exec.share_logs``), oldest first: every site's, or ``envoy``'s alone.

        Without ``follow`` it stops after the lines the director keeps (its
        last 10,000); with it, it waits for new lines until the experiment
        ends, reopening a dropped connection without repeating a line.
        """
        fed = self._fed
        last = 0
        backoff = 0.2
        failing_since: Optional[float] = None
        while True:
            req = pb.WatchRunnerLogsRequest(experiment=self._ref(), envoy=envoy, after_sequence=last, follow=follow)
            call = fed._stub.WatchRunnerLogs(req, timeout=None if follow else fed.timeout)
            try:
                for line in call:
                    if line.sequence <= last:
                        continue
                    last = line.sequence
                    failing_since = None
                    backoff = 0.2
                    yield RunnerLogLine.from_proto(line)
                return
            except grpc.RpcError as e:
                if not follow or e.code() not in _RETRYABLE:
                    raise from_rpc(e, f"reading the runner output of {self.name}") from None
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > fed.reconnect_timeout:
                    raise from_rpc(e, f"reading the runner output of {self.name}: gave up after {fed.reconnect_timeout:g}s") from None
                fed._await_channel(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                call.cancel()

    def metrics_rows(self, after: int = 0) -> List[Dict[str, Any]]:
        """The events so far as rows (see :func:`fx.metrics_table`), without waiting."""
        return metrics_table(self.metrics(after=after, follow=False))

    def metrics_frame(self, after: int = 0) -> Any:
        """The events so far as a pandas DataFrame (see :func:`fx.metrics_frame`), without waiting.

        One row per round, task, collaborator ("" for the aggregate) and
        metric, with its value, samples and time: the columns of
        ``fx experiment metrics --csv``. Raises ImportError, saying how to
        install it, when pandas is missing.
        """
        return metrics_frame(self.metrics(after=after, follow=False))

    # -- waiting

    def wait(self, timeout: Optional[float] = None, on_event: Optional[Callable[[MetricEvent], None]] = None) -> ExperimentStatus:
        """Blocks until the experiment ends; returns its final status.

        Follows the metric stream (``on_event`` sees every event) rather than
        polling, and rides out a director restart (up to the federation's
        reconnect_timeout). Raises :class:`fx.ExperimentEnded` with the
        director's reason if it ends FAILED, CANCELLED or REJECTED, and
        :class:`fx.FXTimeout` after ``timeout`` seconds.
        """
        fed = self._fed
        deadline = None if timeout is None else time.monotonic() + timeout
        last = 0
        failing_since: Optional[float] = None
        backoff = 0.2

        def failed(err: Exception) -> None:
            # A director away: retry with backoff, within reconnect_timeout.
            nonlocal failing_since, backoff
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > fed.reconnect_timeout:
                raise FXError(
                    f"waiting for {self.name}: the director has been unreachable for {fed.reconnect_timeout:g}s: {err}",
                    code=getattr(err, "code", None) if isinstance(err, FXError) else grpc.StatusCode.UNAVAILABLE,
                ) from None
            fed._await_channel(backoff)
            backoff = min(backoff * 2, 5.0)

        while True:
            try:
                st = self.status()
            except FXError as e:
                if e.code not in _RETRYABLE + (grpc.StatusCode.DEADLINE_EXCEEDED,):
                    raise
                failed(e)
                continue
            if st.ended:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise FXTimeout(
                    f"experiment {self.name} is still {st.state} (round {st.round}/{st.rounds}) after {timeout:g}s",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            # Follow the stream, which ends when the experiment does; a bounded
            # stretch at a time, so the state is read again now and then.
            stretch = 30.0 if remaining is None else max(0.05, min(30.0, remaining))
            call = fed._stub.WatchMetrics(
                pb.WatchMetricsRequest(experiment=self._ref(), after_sequence=last), timeout=stretch, wait_for_ready=True
            )
            try:
                for ev in call:
                    if ev.sequence > last:
                        last = ev.sequence
                        if on_event:
                            on_event(MetricEvent.from_proto(ev))
                failing_since, backoff = None, 0.2
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # a stretch ended: look at the state again
                if code not in _RETRYABLE:
                    raise from_rpc(e, f"waiting for {self.name}") from None
                failed(from_rpc(e, "watching metrics"))
            finally:
                call.cancel()
        if on_event:
            # The experiment ended while the stream was away: hand over the
            # events not seen yet (the stream of an ended experiment ends).
            for ev in self._watch(last, None):
                on_event(ev)
        if st.state != "FINISHED":
            why = f": {st.reason}" if st.reason else ""
            raise ExperimentEnded(f"experiment {self.name} ended {st.state}{why}", st.state, st.reason, st)
        return st

    # -- models

    def download_model(self, which: Union[str, int] = "best", out: Optional[Any] = None, timeout: Optional[float] = None) -> tuple:
        """Streams a model's safetensors bytes; returns (ModelInfo, bytes or None).

        ``which`` is "best", "last" or a round number (0: the initial model).
        The bytes go to the binary file ``out`` when given (and None is
        returned in their place), else into memory. Size and sha256 are
        checked against the director's ModelInfo.
        """
        if isinstance(which, str) and which.lower() in ("best", "last"):
            req = pb.DownloadModelRequest(
                experiment=self._ref(), selector=pb.BEST if which.lower() == "best" else pb.LAST
            )
        elif isinstance(which, (int, np.integer)) and not isinstance(which, bool):
            if which < 0:
                raise FXError(f"round {which} is negative: give 0 for the initial model, or a completed round")
            req = pb.DownloadModelRequest(experiment=self._ref(), selector=pb.ROUND, round=int(which))
        else:
            raise FXError(f"which={which!r}: give 'best', 'last' or a round number")
        what = f"downloading the {which} model of {self.name}" if isinstance(which, str) else f"downloading the round {which} model of {self.name}"
        buf = bytearray() if out is None else None
        h = hashlib.sha256()
        n = 0
        info = None
        call = self._fed._stub.DownloadModel(req, timeout=timeout or max(600.0, self._fed.timeout), wait_for_ready=True)
        try:
            for part in call:
                kind = part.WhichOneof("part")
                if kind == "info":
                    i = part.info
                    info = ModelInfo(round=i.round, size=i.size, sha256=i.sha256, metrics=dict(sorted(i.metrics.items())))
                elif kind == "chunk":
                    if info is None:
                        raise FXError(f"{what}: the director sent model bytes before the model's description")
                    h.update(part.chunk)
                    n += len(part.chunk)
                    if n > info.size:
                        raise FXError(f"{what}: more than the announced {info.size} bytes")
                    if buf is not None:
                        buf += part.chunk
                    else:
                        out.write(part.chunk)
        except grpc.RpcError as e:
            raise from_rpc(e, what) from None
        finally:
            call.cancel()
        if info is None:
            raise FXError(f"{what}: the director sent nothing")
        if n != info.size or (info.sha256 and h.hexdigest() != info.sha256.lower()):
            raise FXError(f"{what}: got {n} bytes with sha256 {h.hexdigest()}, the director announced {info.size} bytes with {info.sha256}")
        return info, (bytes(buf) if buf is not None else None)

    def model(self, which: Union[str, int] = "best") -> Dict[str, np.ndarray]:
        """A model as {tensor name: numpy array}: "best", "last" or a round number."""
        buf = bytearray()

        class _W:
            def write(self, b: bytes) -> None:
                buf.extend(b)

        self.download_model(which, out=_W())
        return read_safetensors(buf)

    def save_model(self, which: Union[str, int], path: Union[str, os.PathLike]) -> ModelInfo:
        """Writes a model's safetensors file to path (atomically); returns its ModelInfo."""
        p = os.fspath(path)
        tmp = f"{p}.part"
        try:
            with open(tmp, "wb") as f:
                info, _ = self.download_model(which, out=f)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return info

    # -- ending

    def cancel(self, reason: str = "") -> ExperimentStatus:
        """Stops the experiment (it becomes CANCELLED); completed rounds' models stay."""
        e = self._fed._unary(
            "CancelExperiment", pb.CancelExperimentRequest(experiment=self._ref(), reason=reason), f"cancelling {self.name}"
        )
        self.last = ExperimentStatus.from_proto(e)
        return self.last

    def remove(self) -> None:
        """Deletes an ended experiment: record, archive, models and metrics."""
        self._fed._unary("RemoveExperiment", pb.RemoveExperimentRequest(experiment=self._ref()), f"removing {self.name}")
