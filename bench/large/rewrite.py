"""fxbench large's site runner: a training script that rewrites every byte.

Each train task adds a small constant to every weight and sends the result,
so a round moves and rewrites the whole model as real training would, at a
cost that is only the bytes: reading the model, one pass of arithmetic,
writing the trained model. Validations send fixed metrics.

FXBENCH_TRAIN_SECONDS, if set (fxbench fedbuff sets it per site through
exec.env), makes each train task sleep that long first: a site's training
time the benchmark chooses, at no CPU cost to the shared machine.
"""

import os
import time

import numpy as np

from fx import site

delay = float(os.environ.get("FXBENCH_TRAIN_SECONDS", "0"))
data = site.data()
for task in site.tasks():
    if task.train:
        if delay > 0:
            time.sleep(delay)
        model = task.model()
        for weights in model.values():
            weights += np.float32(1e-3)
        task.send(model, samples=len(data.train), metrics={"loss": 0.0})
        # Drop every reference (the loop variable too), else the next
        # round's model is read into new memory while this one is held.
        del model, weights
    else:
        task.send(samples=len(data.valid), metrics={"accuracy": 0.5})
