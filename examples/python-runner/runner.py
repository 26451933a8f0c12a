#!/usr/bin/env python3
"""Reference fx runner in numpy: softmax regression on the site's data.

fx starts this program once per experiment at every site that accepts it and
hands it every task through fx.site, the Python site library (which every
envoy puts on PYTHONPATH). It trains multinomial logistic regression with
minibatch SGD and momentum — the tensors of fx's built-in "softmax" model, in
PyTorch's nn.Linear convention: fc0.weight [classes, features], fc0.bias
[classes] — so it doubles as a cross-check of the built-in one and as a
template for runners in other frameworks. It needs numpy only. Under
aggregation.algorithm scaffold it adds SCAFFOLD's correction to every step's
gradient and reports its steps and their size.

    runner.py init --features 784 --classes 10 [--seed 1] [--out model.safetensors]
        writes an initial model for the experiment archive
"""

import math
import sys
import time

import numpy as np

from fx import site

M64 = (1 << 64) - 1

# The hyperparameters this runner knows, with their defaults; seed None
# means the plan's runner.seed.
HYPERPARAMETERS = {"lr": 0.05, "momentum": 0.9, "batch_size": 64, "epochs": 1, "weight_decay": 0.0, "seed": None}


def parse_hyperparameters(hp):
    """The plan's hyperparameters over the defaults; a misspelt key is an error, not a silent default."""
    unknown = sorted(set(hp) - set(HYPERPARAMETERS))
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown} (this runner knows {sorted(HYPERPARAMETERS)})")
    out = dict(HYPERPARAMETERS, **hp)
    for key in ("lr", "momentum", "weight_decay"):
        if not isinstance(out[key], (int, float)) or not math.isfinite(out[key]) or out[key] < 0:
            raise ValueError(f"hyperparameter {key} = {out[key]!r} must be a finite number >= 0")
    for key in ("batch_size", "epochs"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"hyperparameter {key} = {out[key]!r} must be a whole number >= 1")
    return out


def forward(w, b, x, y):
    """Mean cross-entropy, the number of correct predictions, and dL/dlogits."""
    logits = x @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(np.maximum(p[rows, y], 1e-12)).mean())
    correct = int((p.argmax(axis=1) == y).sum())
    p[rows, y] -= 1
    return loss, correct, p / len(y)


def evaluate(w, b, x, y, batch=1024):
    loss_sum, correct = 0.0, 0
    for at in range(0, len(y), batch):
        loss, c, _ = forward(w, b, x[at : at + batch], y[at : at + batch])
        loss_sum += loss * len(y[at : at + batch])
        correct += c
    n = max(len(y), 1)
    return {"loss": loss_sum / n, "accuracy": correct / n}


def train(w, b, x, y, hp, seed, round_, correction=None):
    """Minibatch SGD with momentum (PyTorch's form: v = mu*v + g; w -= lr*v), visiting
    samples in an order drawn from (seed, round) so that a rerun repeats. With SCAFFOLD's
    correction ({name: c - c_i}) it is added to every step's gradient. Returns the metrics
    and the number of steps taken."""
    rng = np.random.default_rng([seed & M64, round_ & M64])
    cw, cb = 0.0, 0.0
    if correction:
        cw, cb = correction["fc0.weight"].astype(np.float64), correction["fc0.bias"].astype(np.float64)
    steps = 0
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
                raise ValueError(f"training diverged in epoch {epoch + 1}; lower the learning rate")
            loss_sum += loss * len(yb)
            correct += c
            vw = mu * vw + grad.T @ xb + wd * w + cw
            vb = mu * vb + grad.sum(axis=0) + cb
            w -= lr * vw
            b -= lr * vb
            steps += 1
        metrics = {"loss": loss_sum / len(y), "accuracy": correct / len(y)}
        print(f"epoch {epoch + 1}/{hp['epochs']}: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}", file=sys.stderr)
    return metrics, steps


def main():
    hp = parse_hyperparameters(site.hyperparameters())
    seed = hp["seed"] if hp["seed"] is not None else site.seed()
    data = site.data()
    # One float64 copy of the shard, made once for every task.
    x_train = np.asarray(data.train.x, dtype=np.float64).reshape(len(data.train), -1)
    x_valid = np.asarray(data.valid.x, dtype=np.float64).reshape(len(data.valid), -1)
    features, classes = x_train.shape[1], data.classes
    print(f"{len(data.train)} training and {len(data.valid)} validation samples, {features} features, {classes} classes", file=sys.stderr)

    for task in site.tasks():
        started = time.monotonic()
        model = task.model()
        want = {"fc0.weight": (classes, features), "fc0.bias": (classes,)}
        if {k: tuple(v.shape) for k, v in model.items()} != want:
            task.fail(f"the model is {({k: list(v.shape) for k, v in model.items()})}; this runner trains softmax regression {want} for this data")
            continue
        w = model["fc0.weight"].astype(np.float64)
        b = model["fc0.bias"].astype(np.float64)
        if task.train:
            metrics, steps = train(w, b, x_train, data.train.y, hp, seed, task.round, task.scaffold_correction())
            # SCAFFOLD's η: the step a unit of gradient takes under momentum (ignored without SCAFFOLD).
            eta = hp["lr"] / (1 - hp["momentum"]) if hp["momentum"] < 1 else None
            task.send({"fc0.weight": w, "fc0.bias": b}, samples=len(data.train), metrics=metrics, steps=steps, step_size=eta)
        else:
            task.send(samples=len(data.valid), metrics=evaluate(w, b, x_valid, data.valid.y))
        print(f"{task.name} round {task.round} done in {time.monotonic() - started:.2f}s", file=sys.stderr)


def init(args):
    """init --features F --classes C [--seed S] [--out PATH]: a Glorot-uniform initial model (F32)."""
    opts = dict(zip(args[::2], args[1::2]))
    unknown = set(opts) - {"--features", "--classes", "--seed", "--out"}
    if unknown or len(args) % 2 or "--features" not in opts or "--classes" not in opts:
        sys.exit("usage: runner.py init --features F --classes C [--seed S] [--out model.safetensors]")
    f, c = int(opts["--features"]), int(opts["--classes"])
    rng = np.random.default_rng(int(opts.get("--seed", 1)))
    limit = math.sqrt(6 / (f + c))
    weights = {"fc0.weight": rng.uniform(-limit, limit, size=(c, f)).astype(np.float32), "fc0.bias": np.zeros(c, np.float32)}
    out = opts.get("--out", "model.safetensors")
    site.save_model(weights, out)
    print(f"wrote {out}: fc0.weight [{c}, {f}], fc0.bias [{c}]")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "init":
        init(sys.argv[2:])
    else:
        main()
