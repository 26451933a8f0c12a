"""A small CNN on Fashion-MNIST as an fx site participant.

fx starts this script once per experiment at every site that accepts it;
fx.site hands it the site's shard of the data and, task after task, the
global model to validate or train. Everything above the loop is a plain
PyTorch training script.

    python3 train.py init       writes model.safetensors, the initial model (run before submitting)
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from fx import site


class Net(nn.Module):
    """Two 5×5 convolutions and two linear layers (~80k parameters): about 0.9 test accuracy after a few epochs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train(model, x, y, hp, seed):
    """One pass of Adam over the shard; returns the mean loss."""
    opt = torch.optim.Adam(model.parameters(), lr=hp.get("lr", 2e-3))
    g = torch.Generator().manual_seed(seed)
    model.train()
    total, bs = 0.0, hp.get("batch_size", 64)
    for _ in range(hp.get("epochs", 1)):
        order = torch.randperm(len(y), generator=g)
        for at in range(0, len(y), bs):
            i = order[at : at + bs]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            opt.step()
            total += loss.item() * len(i)
    return total / (len(y) * hp.get("epochs", 1))


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    logits = torch.cat([model(x[at : at + 1000]) for at in range(0, len(y), 1000)])
    return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}


def main():
    hp = site.hyperparameters()
    data = site.data()
    x_train, y_train = data.train.torch()
    x_valid, y_valid = data.valid.torch()
    x_train, x_valid = x_train.unsqueeze(1), x_valid.unsqueeze(1)  # N×1×28×28
    model = Net()

    for task in site.tasks():
        model.load_state_dict(task.state_dict())
        if task.train:
            loss = train(model, x_train, y_train, hp, seed=site.seed() * 1000 + task.round)
            task.send(model, samples=len(y_train), metrics={"loss": loss})
        else:
            task.send(samples=len(y_valid), metrics=evaluate(model, x_valid, y_valid))


if __name__ == "__main__":
    if sys.argv[1:] == ["init"]:
        torch.manual_seed(1)
        site.save_model(Net(), "model.safetensors")
        print("wrote model.safetensors")
    else:
        main()
