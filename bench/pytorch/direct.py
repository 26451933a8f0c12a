"""The floor of `fxbench pytorch`: the rounds an fx experiment runs, done
directly in one Python process, without fx.

    direct.py ROUNDS HYPER_JSON MODEL DATA...

Each round validates the global model on every shard, trains it one epoch
on every shard, validates each trained model on its shard, and averages the
trained models weighted by their samples (FedAvg): the work of a round at
len(DATA) sites, done one site after another. It prints one JSON line per
round: {"round": r, "seconds": s, "accuracy": mean validation accuracy of
the global model}.
"""

import json
import sys
import time

import torch

from fx import site
from mlp import MLP, evaluate, train


def load_shard(path):
    """A data file as fx writes it for a runner (runner/exec.WriteDataFile)."""
    t = site.load_model(path, torch=True)
    return t["train.x"], t["train.y"], t["valid.x"], t["valid.y"]


def main(rounds, hp, model_path, data_paths):
    shards = [load_shard(p) for p in data_paths]
    state = site.load_model(model_path, torch=True)
    model = MLP()
    for r in range(1, rounds + 1):
        start = time.monotonic()
        accs, updates, weights = [], [], []
        for xt, yt, xv, yv in shards:
            model.load_state_dict(state)
            accs.append(evaluate(model, xv, yv)["accuracy"])
            train(model, xt, yt, hp, 1000 + r)
            evaluate(model, xv, yv)
            updates.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(yt))
        total = sum(weights)
        state = {k: sum(u[k] * (w / total) for u, w in zip(updates, weights)) for k in state}
        print(json.dumps({"round": r, "seconds": time.monotonic() - start, "accuracy": sum(accs) / len(accs)}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:])
