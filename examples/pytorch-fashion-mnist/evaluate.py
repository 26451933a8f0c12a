"""Test accuracy of a model downloaded from fx on Fashion-MNIST's 10,000 held-out test images.

    fx experiment model fashion-cnn --best -o best.safetensors
    python3 evaluate.py best.safetensors [/usr/share/datasets/fashion-mnist]
"""

import gzip
import os
import sys

import numpy as np
import torch

from fx import site
from train import Net


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(directory, stem):
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    sys.exit(f"evaluate.py: no {stem}[.gz] in {directory}")


def main(model_path, directory="/usr/share/datasets/fashion-mnist"):
    x = torch.from_numpy(read_idx(find(directory, "t10k-images-idx3-ubyte")).astype(np.float32) / 255).unsqueeze(1)
    y = torch.from_numpy(read_idx(find(directory, "t10k-labels-idx1-ubyte")).astype(np.int64))
    model = Net()
    model.load_state_dict(site.load_model(model_path, torch=True))
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[at : at + 1000]).argmax(1) for at in range(0, len(y), 1000)])
    print(f"test accuracy {(pred == y).float().mean().item():.4f} on {len(y)} images")


if __name__ == "__main__":
    main(*sys.argv[1:])
