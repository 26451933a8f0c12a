"""The PyTorch MLP of `fxbench pytorch`: fx's built-in MLP (784-128-10, ReLU,
momentum SGD) in PyTorch, as an fx site participant.

The same module and training function serve the floor (direct.py, the same
rounds in one Python process) and the fx run, so the two differ only by fx.
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """fx's built-in mlp with hidden [128]: the same tensor names and shapes."""

    def __init__(self, features=784, hidden=128, classes=10):
        super().__init__()
        self.fc0 = nn.Linear(features, hidden)
        self.fc1 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc1(F.relu(self.fc0(x.flatten(1))))


def train(model, x, y, hp, seed):
    """One epoch (hp: lr, momentum, batch_size) in an order drawn from seed."""
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    model.train()
    total, correct, bs = 0.0, 0, hp["batch_size"]
    for at in range(0, len(y), bs):
        i = order[at : at + bs]
        opt.zero_grad()
        out = model(x[i])
        loss = F.cross_entropy(out, y[i])
        loss.backward()
        opt.step()
        total += loss.item() * len(i)
        correct += (out.argmax(1) == y[i]).sum().item()
    return {"loss": total / len(y), "accuracy": correct / len(y)}


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    out = model(x)
    return {"loss": F.cross_entropy(out, y).item(), "accuracy": (out.argmax(1) == y).float().mean().item()}


def main():
    from fx import site

    hp = site.hyperparameters()
    data = site.data()
    x_train, y_train = data.train.torch()
    x_valid, y_valid = data.valid.torch()
    model = MLP(features=x_train[0].numel(), classes=data.classes)
    for task in site.tasks():
        model.load_state_dict(task.state_dict())
        if task.train:
            metrics = train(model, x_train, y_train, hp, site.seed() * 1000 + task.round)
            task.send(model, samples=len(y_train), metrics=metrics)
        else:
            task.send(samples=len(y_valid), metrics=evaluate(model, x_valid, y_valid))


if __name__ == "__main__":
    if sys.argv[1:2] == ["init"]:
        from fx import site

        torch.manual_seed(1)
        site.save_model(MLP(), sys.argv[2])
    else:
        main()
