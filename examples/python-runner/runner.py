#!/usr/bin/env python3
"""Reference external runner for fx: the runner protocol, version 1.

fx starts this program once per task, in the unpacked experiment directory,
with a clean environment in which FX_TASK_JSON names the task description
(see docs/runner-protocol.md). The program reads the input model (safetensors),
loads the site's data as the task's "data" settings describe, trains or
evaluates multinomial logistic regression (softmax regression) with numpy, and
writes output/model.safetensors (train only) and output/metrics.json.

The model has the tensors of fx's built-in "softmax" model, in PyTorch's
nn.Linear convention: fc0.weight [classes, features] and fc0.bias [classes].

It depends on numpy only. Everything it exchanges with fx is safetensors and
JSON: nothing is pickled, so nothing it reads can run code.

Other commands, for the people preparing or checking an experiment:

    runner.py init --features 784 --classes 10 [--seed 1] [--out model.safetensors]
        writes an initial model for the experiment archive
    runner.py describe-data '{"kind": "idx", "path": "...", "shard": "2/4"}'
        loads the data as a task would and prints a JSON summary of it
"""

import gzip
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

PROTOCOL = 1

# ---------------------------------------------------------------------------
# safetensors, in pure Python and numpy
#
#   8 bytes   N, the header length, little-endian unsigned
#   N bytes   JSON: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]},
#             ..., "__metadata__": {"k": "v"}}
#   rest      the tensors' bytes, little-endian, row-major, offsets relative
#             to the start of this section
# ---------------------------------------------------------------------------

# numpy dtypes of the safetensors dtypes that have one. BF16 has no numpy
# type: it is read as uint16 and widened to float32 (see read_safetensors).
NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DTYPE_SIZES = {name: dt.itemsize for name, dt in NUMPY_DTYPES.items()}
DTYPE_SIZES["BF16"] = 2

MAX_HEADER = 100 * 1024 * 1024  # as the reference implementation


class RunnerError(Exception):
    """A problem this runner reports in one line on stderr before exiting 1."""


def read_safetensors(path):
    """Read a safetensors file.

    Returns ({name: ndarray}, {name: dtype string}, metadata dict). BF16
    tensors come back as float32 arrays; the dtype map remembers BF16 so that
    write_safetensors can write them back as they came.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise RunnerError(f"{path}: {len(raw)} bytes is too short for a safetensors file")
    n = int.from_bytes(raw[:8], "little")
    if n > MAX_HEADER or 8 + n > len(raw):
        raise RunnerError(f"{path}: header length {n} does not fit a {len(raw)}-byte file")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RunnerError(f"{path}: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise RunnerError(f"{path}: header is not a JSON object")
    data = memoryview(raw)[8 + n :]
    metadata = header.pop("__metadata__", None) or {}
    tensors, dtypes, spans = {}, {}, []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise RunnerError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets") from None
        if dtype not in DTYPE_SIZES:
            raise RunnerError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RunnerError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(data)) or end - begin != size:
            raise RunnerError(f"{path}: tensor {name!r} {dtype}{shape} has data_offsets [{begin}, {end}] that do not fit")
        buf = data[begin:end]
        if dtype == "BF16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=NUMPY_DTYPES[dtype]).copy()
        tensors[name] = arr.reshape(shape)
        dtypes[name] = dtype
        spans.append((begin, end))
    spans.sort()
    at = 0
    for begin, end in spans:
        if begin != at:
            raise RunnerError(f"{path}: tensor data has a gap or an overlap at byte {at}")
        at = end
    if at != len(data):
        raise RunnerError(f"{path}: {len(data) - at} bytes follow the last tensor")
    return tensors, dtypes, metadata


def _to_bf16_bits(a):
    """Round float32 values to bfloat16 (to nearest even) and return the bits."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(a)
    out[nan] = 0x7FC0
    return out


def write_safetensors(path, tensors, dtypes=None, metadata=None):
    """Write {name: array} as safetensors, atomically (a temporary file renamed
    over path), in name order, with the data section 8-byte aligned. dtypes
    maps names to safetensors dtypes (default: F32)."""
    dtypes = dtypes or {}
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        dtype = dtypes.get(name, "F32")
        a = np.asarray(tensors[name])
        if dtype == "BF16":
            b = _to_bf16_bits(a).astype("<u2").tobytes()
        elif dtype in NUMPY_DTYPES:
            b = np.ascontiguousarray(a, dtype=NUMPY_DTYPES[dtype]).tobytes()
        else:
            raise RunnerError(f"cannot write tensor {name!r} as {dtype!r}")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-(8 + len(h)) % 8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".model-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(h).to_bytes(8, "little"))
            f.write(h)
            for b in chunks:
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, doc):
    """Write JSON atomically. allow_nan=False: fx refuses NaN and Infinity, and
    failing here names the culprit sooner."""
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Go's math/rand/v2 PCG, so that shard "i/N" picks exactly the samples fx's
# built-in loaders pick for the same seed (package dataset: PCG-DXSM seeded
# (seed, stream), Perm by Fisher-Yates with Lemire's bounded integers).
# ---------------------------------------------------------------------------

M64 = (1 << 64) - 1
M128 = (1 << 128) - 1
STREAM_SHARD_IID = 1  # dataset.streamShardIID


class GoPCG:
    MUL = (2549297995355413924 << 64) | 4865540595714422341
    INC = (6364136223846793005 << 64) | 1442695040888963407

    def __init__(self, seed1, seed2):
        self.state = ((seed1 & M64) << 64) | (seed2 & M64)

    def uint64(self):
        self.state = (self.state * self.MUL + self.INC) & M128
        hi, lo = self.state >> 64, self.state & M64
        hi ^= hi >> 32
        hi = (hi * 0xDA942042E4DD58B5) & M64
        hi ^= hi >> 48
        return (hi * (lo | 1)) & M64

    def uint64n(self, n):
        if n & (n - 1) == 0:
            return self.uint64() & (n - 1)
        x = self.uint64() * n
        hi, lo = x >> 64, x & M64
        if lo < n:
            thresh = ((1 << 64) - n) % n
            while lo < thresh:
                x = self.uint64() * n
                hi, lo = x >> 64, x & M64
        return hi

    def perm(self, n):
        p = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.uint64n(i + 1)
            p[i], p[j] = p[j], p[i]
        return p


def parse_shard(s):
    if s in (None, ""):
        return 1, 1
    try:
        a, b = str(s).split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise RunnerError(f'data shard {s!r} is not of the form "i/N"') from None
    if not 1 <= i <= n:
        raise RunnerError(f"data shard {s!r}: want 1 <= i <= N")
    return i, n


def shard_indices(n_train, n_valid, i, n, seed):
    """The rows of shard i/n of each split: a uniform random cut whose part
    sizes differ by at most one, as dataset.partition makes it with no skew."""
    if n_train < n:
        raise RunnerError(f"cannot cut {n_train} training samples into {n} non-empty shards")
    if 0 < n_valid < n:
        raise RunnerError(f"cannot cut {n_valid} validation samples into {n} non-empty shards")
    rng = GoPCG(seed, STREAM_SHARD_IID)
    out = []
    for size in (n_train, n_valid):
        p = rng.perm(size)
        out.append(np.sort(np.array(p[(i - 1) * size // n : i * size // n], dtype=np.int64)))
    return out


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

IDX_FILES = {
    "train_images": ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
    "train_labels": ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
    "valid_images": ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
    "valid_labels": ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
}


def find_idx(directory, names):
    for name in names:
        for candidate in (name, name + ".gz"):
            p = os.path.join(directory, candidate)
            if os.path.exists(p):
                return p
    raise RunnerError(f"idx data: {directory}: neither {names[0]} nor {names[0]}.gz exists")


def read_idx(path):
    """Read an IDX file of unsigned bytes, plain or gzip (by its magic bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise RunnerError(f"{path}: not an IDX file")
    if raw[2] != 0x08:
        raise RunnerError(f"{path}: element type 0x{raw[2]:02x} is not unsigned byte")
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(nd)]
    start = 4 + 4 * nd
    if len(raw) - start != math.prod(dims):
        raise RunnerError(f"{path}: header {dims} announces {math.prod(dims)} bytes, file holds {len(raw) - start}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def load_idx(settings):
    path = settings.get("path")
    if not path:
        raise RunnerError('idx data needs a "path" (the directory holding the IDX files)')
    x_train = read_idx(find_idx(path, IDX_FILES["train_images"]))
    y_train = read_idx(find_idx(path, IDX_FILES["train_labels"]))
    x_valid = read_idx(find_idx(path, IDX_FILES["valid_images"]))
    y_valid = read_idx(find_idx(path, IDX_FILES["valid_labels"]))
    if x_train.shape[1:] != x_valid.shape[1:]:
        raise RunnerError(f"idx data: training images are {x_train.shape[1:]} but test images are {x_valid.shape[1:]}")
    if len(x_train) != len(y_train) or len(x_valid) != len(y_valid):
        raise RunnerError("idx data: image and label counts differ")
    features = math.prod(x_train.shape[1:])
    scale = np.float32(255)
    x_train = x_train.reshape(len(x_train), features).astype(np.float32) / scale
    x_valid = x_valid.reshape(len(x_valid), features).astype(np.float32) / scale
    classes = int(max(y_train.max(initial=0), y_valid.max(initial=0))) + 1
    return x_train, y_train.astype(np.int64), x_valid, y_valid.astype(np.int64), classes


def load_synthetic(settings, seed):
    """Gaussian clusters like fx's synthetic data set (same defaults and
    geometry; not the same numbers, which come from numpy's generator)."""
    f = int(settings.get("features") or 16)
    k = int(settings.get("classes") or 4)
    n_train = int(settings.get("train_samples") or 4000)
    n_valid = int(settings.get("valid_samples") or 1000)
    spread = float(settings.get("cluster_spread") or 1.0)
    if f < 1 or k < 2 or n_train < 1 or n_valid < 0 or not spread > 0:
        raise RunnerError(f"synthetic data: bad settings {settings}")
    rng = np.random.default_rng([seed & M64, 4])
    centres = rng.standard_normal((k, f))
    noise = spread * math.sqrt(f) / 4

    def gen(n):
        y = rng.integers(0, k, size=n)
        x = centres[y] + noise * rng.standard_normal((n, f))
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = gen(n_train)
    x_valid, y_valid = gen(n_valid)
    return x_train, y_train, x_valid, y_valid, k


def load_data(settings):
    """Load the site's data as its settings describe, cut to its shard.
    Returns a dict with x_train, y_train, x_valid, y_valid, classes."""
    kind = settings.get("kind")
    seed = int(settings.get("seed") or 0)
    if kind == "idx":
        x_train, y_train, x_valid, y_valid, classes = load_idx(settings)
    elif kind == "synthetic":
        x_train, y_train, x_valid, y_valid, classes = load_synthetic(settings, seed)
    else:
        raise RunnerError(f"data kind {kind!r} is not supported by this runner (it reads idx and synthetic)")
    if float(settings.get("dirichlet_alpha") or 0) > 0:
        raise RunnerError("data dirichlet_alpha (label skew) is not supported by this runner; use an unskewed shard")
    declared = settings.get("classes")
    if kind == "idx" and declared is not None:
        if int(declared) < classes:
            raise RunnerError(f"data declares {declared} classes but holds label {classes - 1}")
        classes = int(declared)
    i, n = parse_shard(settings.get("shard"))
    if n > 1:
        tr, va = shard_indices(len(y_train), len(y_valid), i, n, seed)
        x_train, y_train, x_valid, y_valid = x_train[tr], y_train[tr], x_valid[va], y_valid[va]
    return {"x_train": x_train, "y_train": y_train, "x_valid": x_valid, "y_valid": y_valid, "classes": classes}


# ---------------------------------------------------------------------------
# Softmax regression
# ---------------------------------------------------------------------------

HYPERPARAMETERS = {"lr": 0.05, "momentum": 0.9, "batch_size": 64, "epochs": 1, "weight_decay": 0.0, "seed": None}


def parse_hyperparameters(hp):
    unknown = sorted(set(hp) - set(HYPERPARAMETERS))
    if unknown:
        raise RunnerError(f"unknown hyperparameters {unknown} (this runner knows {sorted(HYPERPARAMETERS)})")
    out = dict(HYPERPARAMETERS)
    out.update(hp)
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for key in ("lr", "momentum", "weight_decay"):
        if not number(out[key]) or not math.isfinite(out[key]) or out[key] < 0:
            raise RunnerError(f"hyperparameter {key} = {out[key]!r} must be a finite number >= 0")
        out[key] = float(out[key])
    for key in ("batch_size", "epochs"):
        if not number(out[key]) or int(out[key]) != out[key] or out[key] < 1:
            raise RunnerError(f"hyperparameter {key} = {out[key]!r} must be a whole number >= 1")
        out[key] = int(out[key])
    if out["seed"] is not None and (not number(out["seed"]) or int(out["seed"]) != out["seed"]):
        raise RunnerError(f"hyperparameter seed = {out['seed']!r} must be a whole number")
    return out


def check_model(tensors, features, classes):
    """The model must be fx's softmax layout for this data."""
    want = {"fc0.weight": (classes, features), "fc0.bias": (classes,)}
    if set(tensors) != set(want):
        raise RunnerError(f"the input model has tensors {sorted(tensors)}; this runner trains {sorted(want)} (softmax regression)")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise RunnerError(
                f"the input model's {name} is {list(tensors[name].shape)} but the data "
                f"({features} features, {classes} classes) needs {list(shape)}"
            )


def forward(w, b, x, y):
    """Mean cross-entropy, the number of correct predictions, and dL/dlogits."""
    logits = x @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    p = exp / exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(np.maximum(p[rows, y], 1e-12)).mean())
    correct = int((p.argmax(axis=1) == y).sum())
    grad = p
    grad[rows, y] -= 1
    grad /= len(y)
    return loss, correct, grad


def evaluate(w, b, x, y, batch=1024):
    if len(y) == 0:
        return {}
    loss_sum, correct = 0.0, 0
    for at in range(0, len(y), batch):
        loss, c, _ = forward(w, b, x[at : at + batch], y[at : at + batch])
        loss_sum += loss * len(y[at : at + batch])
        correct += c
    return {"loss": loss_sum / len(y), "accuracy": correct / len(y)}


def train(w, b, data, hp, seed, round_, log):
    """Minibatch SGD with momentum (PyTorch's form: v = mu*v + g; w -= lr*v).
    Samples are visited in an order drawn from (seed, round), so rounds differ
    and a rerun repeats. Returns the last epoch's mean loss and accuracy over
    the minibatches as they were trained on."""
    x, y = data["x_train"], data["y_train"]
    rng = np.random.default_rng([seed & M64, round_ & M64])
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    lr, mu, wd, bs = hp["lr"], hp["momentum"], hp["weight_decay"], hp["batch_size"]
    metrics = {}
    for epoch in range(hp["epochs"]):
        order = rng.permutation(len(y))
        loss_sum, correct = 0.0, 0
        for at in range(0, len(y), bs):
            idx = order[at : at + bs]
            xb, yb = x[idx], y[idx]
            loss, c, grad = forward(w, b, xb, yb)
            if not math.isfinite(loss):
                raise RunnerError(f"training diverged in epoch {epoch + 1} (loss {loss}); lower the learning rate")
            loss_sum += loss * len(yb)
            correct += c
            gw = grad.T @ xb + wd * w
            gb = grad.sum(axis=0)
            vw = mu * vw + gw
            vb = mu * vb + gb
            w -= lr * vw
            b -= lr * vb
        metrics = {"loss": loss_sum / len(y), "accuracy": correct / len(y)}
        log(f"epoch {epoch + 1}/{hp['epochs']}: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}")
    return metrics


# ---------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------


def log(msg):
    """Progress goes to stderr, line by line: fx logs every line with the task
    and round, and keeps the last lines for the error of a failed task."""
    print(f"runner.py: {msg}", file=sys.stderr, flush=True)


def run_task(task):
    if task.get("protocol") != PROTOCOL:
        raise RunnerError(f"task.json speaks runner protocol {task.get('protocol')!r}; this runner speaks {PROTOCOL}")
    name, round_, is_train = task["task"], int(task["round"]), bool(task["train"])
    hp = parse_hyperparameters(task.get("hyperparameters") or {})
    seed = int(hp["seed"] if hp["seed"] is not None else task.get("seed", 0))
    started = time.monotonic()

    tensors, dtypes, _ = read_safetensors(task["input_model"])
    data = load_data(task.get("data") or {})
    features, classes = data["x_train"].shape[1], data["classes"]
    check_model(tensors, features, classes)
    log(
        f"{name} round {round_}: {len(data['y_train'])} training and {len(data['y_valid'])} "
        f"validation samples, {features} features, {classes} classes"
    )
    w = tensors["fc0.weight"].astype(np.float64)
    b = tensors["fc0.bias"].astype(np.float64)

    if is_train:
        metrics = train(w, b, data, hp, seed, round_, log)
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise RunnerError("training produced non-finite weights; lower the learning rate")
        write_safetensors(task["output_model"], {"fc0.weight": w, "fc0.bias": b}, dtypes)
        samples = len(data["y_train"])
    else:
        metrics = evaluate(w, b, data["x_valid"], data["y_valid"])
        samples = len(data["y_valid"])
    write_json(task["output_metrics"], {"samples": samples, "metrics": metrics})
    log(f"{name} round {round_} done in {time.monotonic() - started:.2f}s: {samples} samples, {metrics}")


def cmd_init(args):
    """init --features F --classes C [--seed S] [--out PATH]: a Glorot-uniform
    initial model in fx's softmax layout (F32)."""
    opts = {"--features": None, "--classes": None, "--seed": "1", "--out": "model.safetensors"}
    it = iter(args)
    for a in it:
        if a not in opts:
            raise RunnerError(f"init: unknown option {a!r} (want {', '.join(opts)})")
        opts[a] = next(it, None)
        if opts[a] is None:
            raise RunnerError(f"init: {a} needs a value")
    if opts["--features"] is None or opts["--classes"] is None:
        raise RunnerError("init needs --features and --classes")
    try:
        f, c, seed = int(opts["--features"]), int(opts["--classes"]), int(opts["--seed"])
    except ValueError as e:
        raise RunnerError(f"init: {e}") from None
    if f < 1 or c < 2:
        raise RunnerError("init: want --features >= 1 and --classes >= 2")
    rng = np.random.default_rng(seed)
    limit = math.sqrt(6 / (f + c))
    w = rng.uniform(-limit, limit, size=(c, f)).astype(np.float32)
    write_safetensors(opts["--out"], {"fc0.weight": w, "fc0.bias": np.zeros(c, np.float32)})
    print(f"wrote {opts['--out']}: fc0.weight [{c}, {f}], fc0.bias [{c}]")


def cmd_describe_data(args):
    """describe-data SETTINGS_JSON: what a task would see, with digests of the
    arrays so two loaders can be compared."""
    import hashlib

    if len(args) != 1:
        raise RunnerError("describe-data takes one argument: the data settings as JSON")
    data = load_data(json.loads(args[0]))

    def split(x, y):
        return {
            "samples": int(len(y)),
            "x_sha256": hashlib.sha256(np.ascontiguousarray(x, dtype="<f4").tobytes()).hexdigest(),
            "y_sha256": hashlib.sha256(np.ascontiguousarray(y, dtype="<i4").tobytes()).hexdigest(),
            "class_counts": np.bincount(y, minlength=data["classes"]).tolist(),
        }

    print(
        json.dumps(
            {
                "features": int(data["x_train"].shape[1]),
                "classes": int(data["classes"]),
                "train": split(data["x_train"], data["y_train"]),
                "valid": split(data["x_valid"], data["y_valid"]),
            },
            indent=2,
        )
    )


def main(argv):
    try:
        if len(argv) > 1 and argv[1] == "init":
            cmd_init(argv[2:])
            return 0
        if len(argv) > 1 and argv[1] == "describe-data":
            cmd_describe_data(argv[2:])
            return 0
        if len(argv) > 2:
            raise RunnerError(f"usage: {argv[0]} [TASK_JSON] | init ... | describe-data SETTINGS_JSON")
        path = argv[1] if len(argv) == 2 else os.environ.get("FX_TASK_JSON")
        if not path:
            raise RunnerError("no task: FX_TASK_JSON is not set (fx sets it) and no task.json was given")
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
        run_task(task)
        return 0
    except RunnerError as e:
        print(f"runner.py: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
