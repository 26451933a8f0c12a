"""fx.site: turn a training script into an fx site participant.

An experiment whose plan says ``runner: {kind: exec, command: [python3, train.py]}``
runs ``train.py`` at every site that accepts it. With this module the script
is an ordinary training script plus a loop::

    import torch
    from fx import site

    model = Net()
    train_set = site.data().train            # the site's shard, as fx cut it
    for task in site.tasks():                # one process serves every task
        model.load_state_dict(task.state_dict())
        if task.train:
            loss = fit(model, train_set, **task.hyperparameters)
            task.send(model, samples=len(train_set), metrics={"loss": loss})
        else:
            task.send(samples=..., metrics=evaluate(model, site.data().valid))

The protocol (docs/runner-protocol.md) is fx's persistent one: fx starts the
script once per experiment and hands it each task over a pipe; models travel
as safetensors files, never pickles. The same script also runs under the
per-task protocol (``runner.mode: per_task``), where ``tasks()`` yields the
one task of the process.

Only numpy is needed; ``state_dict()`` and sending PyTorch tensors or modules
need torch, imported when first used.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from .safetensors import _DTYPES, MAX_HEADER_BYTES, SafetensorsError, parse_header

__all__ = [
    "Data",
    "Split",
    "Task",
    "data",
    "experiment_dir",
    "hyperparameters",
    "load_model",
    "save_model",
    "seed",
    "setup",
    "tasks",
]

# The protocol versions this module speaks.
PER_TASK_PROTOCOL = 1
PERSISTENT_PROTOCOL = 2


class ProtocolError(RuntimeError):
    """fx and this script disagree about the runner protocol."""


# ---------------------------------------------------------------------------
# safetensors, fast paths: files read into one buffer that every array (or
# tensor) shares, and written straight from the arrays' memory.


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int


def _read_header(path: str) -> Tuple[Dict[str, _Entry], Dict[str, str], int]:
    """The tensors of a safetensors file (in file order), its metadata, and where its data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length {n} is over {MAX_HEADER_BYTES} bytes")
        header, meta, start = parse_header(head + f.read(n))
    entries = {}
    for name, info in header.items():
        entries[name] = _Entry(info["dtype"], tuple(info["shape"]), *info["data_offsets"])
    return entries, meta or {}, start


# Buffers of models read earlier, kept for the next read of the same size. A
# fresh buffer costs a page fault on every page it touches, and under some
# hypervisors a fault costs as much as copying the page forty times: reading
# a 512 MiB model into new memory took 2 s where reading it into memory
# touched before took 0.1 s. A buffer is reused only once nothing refers to
# it any more (every array made from it holds a reference).
_spare_buffers: list = []
_SPARE_BUFFERS = 2


def _new_buffer(size: int) -> Any:
    """Zero-filled, writable memory of size bytes: anonymous pages (not a
    bytearray, which would write every page once to zero it), in huge pages
    where the system allows."""
    import mmap

    if size == 0:
        return bytearray()
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return buf


def _buffer(size: int) -> Any:
    for i in range(len(_spare_buffers)):
        # 2: the list's reference and getrefcount's argument.
        if len(_spare_buffers[i]) == size and sys.getrefcount(_spare_buffers[i]) == 2:
            return _spare_buffers[i]
    buf = _new_buffer(size)
    free = [i for i in range(len(_spare_buffers)) if sys.getrefcount(_spare_buffers[i]) == 2]
    if len(_spare_buffers) >= _SPARE_BUFFERS and free:
        del _spare_buffers[free[0]]
    if len(_spare_buffers) < _SPARE_BUFFERS:
        _spare_buffers.append(buf)
    return buf


def _read_buffer(path: str) -> Any:
    """The whole file in one writable buffer (arrays made from it share it)."""
    size = os.path.getsize(path)
    buf = _buffer(size)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buf)
        try:
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise SafetensorsError(f"{path}: file ended after {got} of {size} bytes")
                got += n
        finally:
            view.release()
    return buf


def _count(shape: Tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _numpy_arrays(path: str) -> Dict[str, np.ndarray]:
    entries, _, start = _read_header(path)
    buf = _read_buffer(path)
    out = {}
    for name, e in entries.items():
        if e.dtype == "BF16":
            raw = np.frombuffer(buf, dtype="<u2", count=_count(e.shape), offset=start + e.begin)
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(e.shape)
        elif e.dtype in _DTYPES:
            out[name] = np.frombuffer(buf, dtype=_DTYPES[e.dtype], count=_count(e.shape), offset=start + e.begin).reshape(e.shape)
        else:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {e.dtype}, which numpy cannot hold")
    return out


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the site
        raise ImportError(
            "fx.site: this call needs PyTorch (import torch failed); use task.model() for numpy arrays instead"
        ) from e
    return torch


def _torch_dtypes(torch) -> Dict[str, Any]:
    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


def _torch_tensors(path: str) -> Dict[str, Any]:
    torch = _torch()
    dtypes = _torch_dtypes(torch)
    entries, _, start = _read_header(path)
    buf = _read_buffer(path)
    out = {}
    for name, e in entries.items():
        if e.dtype not in dtypes:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {e.dtype}, which PyTorch cannot hold")
        n = _count(e.shape)
        if n == 0:
            out[name] = torch.empty(e.shape, dtype=dtypes[e.dtype])
            continue
        at = start + e.begin
        src = buf
        if at % torch.empty(0, dtype=dtypes[e.dtype]).element_size():
            src, at = bytearray(buf[at : start + e.end]), 0  # misaligned: copy this one tensor
        t = torch.frombuffer(src, dtype=dtypes[e.dtype], count=n, offset=at)
        out[name] = t.reshape(e.shape)
    return out


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, rounding to nearest even."""
    u = np.ascontiguousarray(a, dtype="<f4").view("<u4").astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def _as_array(name: str, value: Any, e: _Entry) -> np.ndarray:
    """value (a torch tensor or anything numpy takes) as a contiguous array of e's dtype and shape."""
    if hasattr(value, "detach"):  # a torch tensor
        torch = _torch()
        target = _torch_dtypes(torch).get(e.dtype)
        if target is None:
            raise ValueError(f"tensor {name!r}: the model's dtype {e.dtype} has no PyTorch equivalent")
        t = value.detach()
        if t.dtype != target:
            t = t.to(target)
        t = t.cpu().contiguous()
        if tuple(t.shape) != e.shape:
            raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, the model's is {list(e.shape)}")
        if e.dtype == "BF16":
            return t.view(torch.int16).numpy().view("<u2")
        return t.numpy()
    a = np.asarray(value)
    if tuple(a.shape) != e.shape:
        raise ValueError(f"tensor {name!r} has shape {list(a.shape)}, the model's is {list(e.shape)}")
    if e.dtype == "BF16":
        return _bf16_bits(a)
    return np.ascontiguousarray(a, dtype=_DTYPES[e.dtype])


def _state(weights: Any) -> Mapping[str, Any]:
    if hasattr(weights, "state_dict") and callable(weights.state_dict):
        return weights.state_dict()
    if isinstance(weights, Mapping):
        return weights
    raise TypeError(f"weights must be a torch.nn.Module, a state_dict or a mapping of arrays, not {type(weights).__name__}")


def _write(path: str, arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str], metadata: Optional[Mapping[str, str]] = None, reuse: Optional[str] = None) -> None:
    """Writes arrays (already in their safetensors dtypes) in name order, from their own memory:
    atomically under a temporary name, or, given reuse (an old file fx no longer needs), over
    that file renamed to path, in place: its pages are in memory already, which makes writing
    a large model several times faster than writing a new file."""
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = sorted(arrays)
    for name in names:
        n = arrays[name].nbytes
        header[name] = {"dtype": dtypes[name], "shape": list(arrays[name].shape), "data_offsets": [offset, offset + n]}
        offset += n
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * (-len(hj) % 8)
    tmp = None
    if reuse and os.path.isfile(reuse) and not os.path.islink(reuse):
        os.replace(reuse, path)
        f = open(path, "r+b")
    else:
        tmp = f"{path}.tmp-{os.getpid()}"
        f = open(tmp, "wb")
    with f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for name in names:
            a = arrays[name]
            if a.nbytes:
                f.write(memoryview(a).cast("B"))
        f.truncate()
    if tmp is not None:
        os.replace(tmp, path)


_NUMPY_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items()}


def save_model(weights: Any, path: str, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes a model (a torch.nn.Module, its state_dict, or {name: numpy array}) as safetensors.

    Names and dtypes are kept (bfloat16 included), so ``save_model(Net(), "model.safetensors")``
    makes an experiment's initial model that every site starts from.
    """
    state = _state(weights)
    arrays, dtypes = {}, {}
    for name, value in state.items():
        if hasattr(value, "detach"):
            torch = _torch()
            rev = {v: k for k, v in _torch_dtypes(torch).items()}
            dt = rev.get(value.dtype)
            if dt is None:
                raise ValueError(f"tensor {name!r}: dtype {value.dtype} has no safetensors name")
            arrays[name] = _as_array(name, value, _Entry(dt, tuple(value.shape), 0, 0))
        else:
            a = np.asarray(value)
            dt = _NUMPY_NAMES.get(a.dtype.newbyteorder("<").str if a.dtype.itemsize > 1 else a.dtype.str)
            if dt is None:
                raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
            arrays[name] = np.ascontiguousarray(a, dtype=_DTYPES[dt])
        dtypes[name] = dt
    _write(os.fspath(path), arrays, dtypes, metadata)


def load_model(path: str, torch: bool = False) -> Dict[str, Any]:
    """Reads a safetensors model: {name: numpy array}, or PyTorch tensors with torch=True (dtypes kept)."""
    return _torch_tensors(os.fspath(path)) if torch else _numpy_arrays(os.fspath(path))


# ---------------------------------------------------------------------------
# The site's data.


@dataclass
class Split:
    """One split of the site's data: ``x`` holds the samples (N × sample shape, float32), ``y`` the labels (N, int64)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def torch(self) -> Tuple[Any, Any]:
        """(x, y) as PyTorch tensors (copied once out of the read-only file mapping)."""
        torch = _torch()
        return torch.from_numpy(np.array(self.x)), torch.from_numpy(np.array(self.y))


@dataclass
class Data:
    """The site's data set as the envoy loaded and cut it (its shard of the federation's data)."""

    train: Split
    valid: Split
    classes: int
    sample_shape: Tuple[int, ...]
    class_names: Optional[list]
    description: str
    settings: Dict[str, Any]


# ---------------------------------------------------------------------------
# The conversation with fx.


class _Session:
    """What fx handed this process: the setup, and (persistent) the control pipes."""

    def __init__(self) -> None:
        self.protocol = int(os.environ.get("FX_PROTOCOL", "0") or 0)
        self._in = self._out = None
        self._setup: Optional[Dict[str, Any]] = None
        self._task_json: Optional[Dict[str, Any]] = None
        self._data: Optional[Data] = None
        self.ready_sent = False
        if self.protocol == PERSISTENT_PROTOCOL:
            fin, fout = int(os.environ["FX_CONTROL_IN"]), int(os.environ["FX_CONTROL_OUT"])
            # Programs the script starts must not inherit the pipes.
            os.set_inheritable(fin, False)
            os.set_inheritable(fout, False)
            self._in = os.fdopen(fin, "rb")
            self._out = os.fdopen(fout, "wb", buffering=0)
        elif self.protocol == PER_TASK_PROTOCOL:
            with open(os.environ["FX_TASK_JSON"], encoding="utf-8") as f:
                self._task_json = json.load(f)
            if self._task_json.get("protocol") != PER_TASK_PROTOCOL:
                raise ProtocolError(f"task.json speaks protocol {self._task_json.get('protocol')}, this fx.site speaks 1 and 2")
        else:
            raise ProtocolError(
                "fx.site: this script is not running under fx (FX_PROTOCOL is "
                f"{os.environ.get('FX_PROTOCOL', 'unset')!r}); an envoy starts it for an experiment's exec runner"
            )

    def setup(self) -> Dict[str, Any]:
        if self._setup is None:
            if self._task_json is not None:
                self._setup = self._task_json
            else:
                msg = self.receive()
                if msg is None or msg.get("type") != "setup":
                    raise ProtocolError(f"fx's first message must be a setup, got {msg!r}")
                if msg.get("protocol") != PERSISTENT_PROTOCOL:
                    raise ProtocolError(f"fx speaks protocol {msg.get('protocol')}, this fx.site speaks {PERSISTENT_PROTOCOL}")
                self._setup = msg
        return self._setup

    def receive(self) -> Optional[Dict[str, Any]]:
        line = self._in.readline()
        if not line:
            return None
        return json.loads(line)

    def send(self, msg: Dict[str, Any]) -> None:
        self._out.write(json.dumps(msg, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n")

    def data(self) -> Data:
        if self._data is None:
            s = self.setup()
            path = s.get("data_file")
            if not path:
                raise RuntimeError(
                    "fx.site.data(): fx did not load this site's data (its kind is not one fx reads); "
                    "read it yourself from site.setup()['data'], the site's data settings"
                )
            entries, meta, start = _read_header(path)

            def arr(name: str) -> np.ndarray:
                e = entries[name]
                if _count(e.shape) == 0:
                    return np.zeros(e.shape, dtype=_DTYPES[e.dtype])
                return np.memmap(path, dtype=_DTYPES[e.dtype], mode="r", offset=start + e.begin, shape=e.shape)

            self._data = Data(
                train=Split(arr("train.x"), arr("train.y")),
                valid=Split(arr("valid.x"), arr("valid.y")),
                classes=int(meta.get("classes", "0")),
                sample_shape=tuple(json.loads(meta.get("sample_shape", "[]"))),
                class_names=json.loads(meta["class_names"]) if "class_names" in meta else None,
                description=meta.get("description", ""),
                settings=dict(s.get("data") or {}),
            )
        return self._data


_session: Optional[_Session] = None


def _get() -> _Session:
    global _session
    if _session is None:
        _session = _Session()
        try:  # progress lines reach the site's log as they are printed
            sys.stdout.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):  # pragma: no cover
            pass
    return _session


def setup() -> Dict[str, Any]:
    """Everything fx handed the runner: hyperparameters, seed, data settings, directories (a dict)."""
    return _get().setup()


def hyperparameters() -> Dict[str, Any]:
    """The plan's runner.hyperparameters."""
    return dict(setup().get("hyperparameters") or {})


def seed() -> int:
    """The plan's runner.seed."""
    return int(setup().get("seed", 0))


def experiment_dir() -> str:
    """The unpacked experiment directory (also the working directory)."""
    return setup()["experiment_dir"]


def data() -> Data:
    """The site's data as the envoy loaded and cut it: mapped from one file, read once by the OS."""
    return _get().data()


class Task:
    """One task fx asks of the site: validate or train a model, then ``send`` the result."""

    def __init__(self, spec: Dict[str, Any], per_task: bool) -> None:
        self._spec = spec
        self._per_task = per_task
        self.id: int = int(spec.get("id", 0))
        #: train, aggregated_model_validation or locally_tuned_model_validation
        self.name: str = spec["task"]
        #: True for the train task, whose result carries weights
        self.train: bool = bool(spec["train"])
        #: the federated round
        self.round: int = int(spec["round"])
        self.input_model: str = spec["input_model"]
        self.output_model: Optional[str] = spec.get("output_model") or None
        self.deadline: Optional[str] = spec.get("deadline")
        #: FedProx's μ, the plan's training.proximal_mu (0.0: plain training); see proximal_term
        self.proximal_mu: float = float(spec.get("proximal_mu") or 0.0)
        self._correction_path: Optional[str] = (spec.get("scaffold") or {}).get("correction")
        #: True for a SCAFFOLD experiment's train task: apply scaffold_correct(model) to every step's
        #: gradients, and send steps= and step_size=
        self.scaffold: bool = self._correction_path is not None
        self._correction: Optional[Dict[str, Any]] = None
        self.sent = False
        self._entries: Optional[Dict[str, _Entry]] = None
        self._global: Optional[Dict[str, Any]] = None

    def __repr__(self) -> str:
        return f"Task({self.name!r}, round={self.round})"

    @property
    def hyperparameters(self) -> Dict[str, Any]:
        return hyperparameters()

    @property
    def seed(self) -> int:
        return seed()

    def _layout(self) -> Dict[str, _Entry]:
        if self._entries is None:
            self._entries = _read_header(self.input_model)[0]
        return self._entries

    def model(self) -> Dict[str, np.ndarray]:
        """The model to start from, as {name: numpy array} (BF16 widened to float32)."""
        return _numpy_arrays(self.input_model)

    def state_dict(self) -> Dict[str, Any]:
        """The model to start from, as {name: torch.Tensor}, names and dtypes as the experiment's model."""
        return _torch_tensors(self.input_model)

    def proximal_term(self, model: Any) -> Any:
        """FedProx's proximal term, (μ/2)·Σ‖p − p_global‖² over the module's trainable parameters, as a
        torch scalar to add to the loss of every step of the train task::

            loss = F.cross_entropy(model(x), y) + task.proximal_term(model)

        μ is the plan's training.proximal_mu and p_global the model this task started from: read once,
        on the first call, as a copy on each parameter's device and dtype that no gradient reaches.
        With μ = 0 it is a constant 0. Numpy training loops add μ·(w − w_global) to their gradients
        themselves, from ``task.proximal_mu`` and ``task.model()``."""
        if not self.train:
            raise RuntimeError(f"{self!r}: proximal_term() belongs in the train task's loss")
        torch = _torch()
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if self.proximal_mu == 0 or not params:
            device = params[0][1].device if params else None
            return torch.zeros((), device=device)
        if self._global is None:
            stored = _torch_tensors(self.input_model)
            missing = [name for name, _ in params if name not in stored]
            if missing:
                raise ValueError(
                    f"the module's parameters {missing[:5]} are not in the task's model: "
                    "pass the module whose state_dict the task's model loads into"
                )
            # Copies, so the model file's buffer is not held for the task's length.
            self._global = {name: stored[name].to(device=p.device, dtype=p.dtype, copy=True) for name, p in params}
        total = sum(((p - self._global[name]) ** 2).sum() for name, p in params)
        return (self.proximal_mu / 2) * total

    def scaffold_correction(self) -> Dict[str, np.ndarray]:
        """SCAFFOLD's correction c − c_i for this train task, as {parameter name: float32 numpy
        array}: numpy training loops add it to each parameter's gradient at every step. Empty when
        the experiment does not run SCAFFOLD."""
        if not self.scaffold:
            return {}
        return _numpy_arrays(self._correction_path)

    def scaffold_correct(self, model: Any) -> None:
        """Applies SCAFFOLD's correction to the gradients of a torch module, in place: call it after
        ``loss.backward()`` and before ``optimizer.step()`` at every step of the train task::

            loss.backward()
            task.scaffold_correct(model)   # SCAFFOLD: g ← g + (c − c_i)
            optimizer.step()

        and report the steps taken and their size with ``task.send(..., steps=K, step_size=lr)``
        (with momentum β, ``step_size=lr / (1 - β)``). It does nothing when the experiment does not
        run SCAFFOLD, so one script serves every plan. The correction is read once, on the first
        call, onto each parameter's device and dtype."""
        if not self.scaffold:
            return
        if not self.train:
            raise RuntimeError(f"{self!r}: scaffold_correct() belongs in the train task's steps")
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if self._correction is None:
            stored = _torch_tensors(self._correction_path)
            missing = [name for name, _ in params if name not in stored]
            if missing:
                raise ValueError(
                    f"the module's parameters {missing[:5]} have no SCAFFOLD correction: "
                    "pass the module whose state_dict the task's model loads into"
                )
            self._correction = {name: stored[name].to(device=p.device, dtype=p.dtype, copy=True) for name, p in params}
        for name, p in params:
            if p.grad is not None:
                p.grad.add_(self._correction[name])

    def send(
        self,
        weights: Any = None,
        *,
        samples: int,
        metrics: Optional[Mapping[str, float]] = None,
        steps: Optional[int] = None,
        step_size: Optional[float] = None,
    ) -> None:
        """Reports the task's result: for train, the new weights (a module, a state_dict or numpy
        arrays with the model's names and shapes; dtypes are converted to the model's), and for
        every task the number of local samples used (FedAvg's weight) and named metrics. A SCAFFOLD
        train task (``task.scaffold``) also reports the local steps it took and their size."""
        if self.sent:
            raise RuntimeError(f"{self!r}: send() was already called")
        extra: Dict[str, Any] = {}
        if self.scaffold and self.train:
            if steps is None or step_size is None:
                raise ValueError(f"{self!r}: a SCAFFOLD train task must send steps= (local steps taken) and step_size= (their size)")
            extra = {"steps": int(steps), "step_size": float(step_size)}
            if extra["steps"] < 1 or not (math.isfinite(extra["step_size"]) and extra["step_size"] > 0):
                raise ValueError(f"steps must be ≥ 1 and step_size a finite number > 0, got {steps} and {step_size}")
        samples = int(samples)
        if samples < 0:
            raise ValueError(f"samples must be ≥ 0, got {samples}")
        clean = {}
        for k, v in (metrics or {}).items():
            f = float(v)
            if not math.isfinite(f):
                raise ValueError(f"metric {k!r} is {f}: metrics must be finite")
            clean[str(k)] = f
        if self.train:
            if weights is None:
                raise ValueError(f"{self!r}: the train task must send the trained weights")
            self._write_weights(weights)
        result = {"samples": samples, "metrics": clean, **extra}
        if self._per_task:
            tmp = self._spec["output_metrics"] + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(result, f, allow_nan=False)
            os.replace(tmp, self._spec["output_metrics"])
        else:
            _get().send({"type": "done", "id": self.id, **result})
        self.sent = True

    def fail(self, reason: str) -> None:
        """Reports that the task cannot be done, with a reason, and goes on to the next task."""
        if self.sent:
            raise RuntimeError(f"{self!r}: the result was already sent")
        if self._per_task:
            print(f"fx.site: task failed: {reason}", file=sys.stderr)
            sys.exit(1)
        _get().send({"type": "failed", "id": self.id, "error": str(reason)})
        self.sent = True

    def _write_weights(self, weights: Any) -> None:
        state = _state(weights)
        layout = self._layout()
        missing = sorted(set(layout) - set(state))
        extra = sorted(set(state) - set(layout))
        if missing or extra:
            raise ValueError(
                f"the weights must have exactly the model's tensors: missing {missing[:5]}, unexpected {extra[:5]} "
                "(load the model with strict=True and send its state_dict)"
            )
        arrays = {name: _as_array(name, state[name], e) for name, e in layout.items()}
        for name, a in arrays.items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"tensor {name!r} holds NaN or Inf: training diverged (lower the learning rate?)")
        _write(self.output_model, arrays, {n: e.dtype for n, e in layout.items()}, reuse=self._spec.get("output_reuse"))


def tasks() -> Iterator[Task]:
    """The tasks fx hands this site, one at a time, until the experiment ends here.

    The first call tells fx the script is ready (everything imported and loaded
    before it counts as start-up). Each task must be answered with ``task.send``
    (or ``task.fail``) before the next one is asked for.
    """
    s = _get()
    if s.protocol == PER_TASK_PROTOCOL:
        s.setup()
        task = Task(s._task_json, per_task=True)
        yield task
        if not task.sent:
            raise RuntimeError(f"{task!r} ended without task.send()")
        return
    s.setup()
    if not s.ready_sent:
        s.send({"type": "ready", "protocol": PERSISTENT_PROTOCOL})
        s.ready_sent = True
    while True:
        msg = s.receive()
        if msg is None or msg.get("type") == "stop":
            return
        if msg.get("type") != "task":
            raise ProtocolError(f"unexpected message from fx: {msg!r}")
        task = Task(msg, per_task=False)
        yield task
        if not task.sent:
            task.fail("the script went on to the next task without task.send()")
