#!/usr/bin/python3
"""Draw fxbench fashion's curves: test accuracy per round, one panel per
sharding, each algorithm a line, the goal a dashed line.

usage: plot.py bench/out/fashion.json bench/fashion.png

fxbench fashion -plot runs it (Debian's python3-matplotlib).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display: write the file only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        res = json.load(f)
    curves = [c for c in res.get("Curves") or [] if not c.get("Skipped")]
    if not curves:
        sys.exit(f"{sys.argv[1]}: no curves to draw")
    # One panel per sharding; the DP curves in one of their own, beside
    # the non-private curve of the same algorithm and sharding, on a scale
    # from 0 (they may sit near chance).
    panels = []
    for sh in dict.fromkeys(c["Sharding"] for c in curves):
        panels.append((f"{sh}, {res['Envoys']} envoys", [c for c in curves if c["Sharding"] == sh and not c.get("DP")], False))
    dp = [c for c in curves if c.get("DP")]
    if dp:
        plain = [c for c in curves if not c.get("DP") and any(c["Sharding"] == d["Sharding"] and c["Algorithm"] == d["Algorithm"] for d in dp)]
        panels.append((f"{dp[0]['Sharding']}, client-level DP at every site", plain + dp, True))
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    central = res.get("Central") or []
    for ax, (title, mine, full) in zip(axes[0], panels):
        rounds = max(len(c["Points"]) - 1 for c in mine)
        for c in mine:
            pts = [p for p in c["Points"] if p["Round"] > 0]
            label = c["Algorithm"]
            if full and not c.get("DP"):
                label += " (no DP)"
            style = "-"
            if c.get("DP"):
                dp = c["DP"]
                label += f" + DP (σ {dp['NoiseMultiplier']:.2f}, ε {dp['Epsilon']:.2f})"
                style = ":"
            ax.plot([p["Round"] for p in pts], [p["Accuracy"] for p in pts], style, marker="o", markersize=3, label=label)
        if central and not full:
            pts = [p for p in central if 0 < p["Round"] <= rounds]
            ax.plot([p["Round"] for p in pts], [p["Accuracy"] for p in pts], "--", color="grey", label="centralised (per step)")
        goal = mine[0]["Goal"]
        ax.axhline(goal, color="black", linewidth=0.8, linestyle="--")
        ax.text(1, goal + 0.002, f"goal {goal:.2f}", fontsize=8)
        if full:
            ax.set_ylim(0, 1)
        else:
            low = min(p["Accuracy"] for c in mine for p in c["Points"] if p["Round"] > 0)
            ax.set_ylim(max(0.0, min(low, goal) - 0.02), max(0.9, goal + 0.02))
        ax.set_xlim(0.5, rounds + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("round (fedbuff: server step)")
        ax.set_ylabel("accuracy on the 10000 test images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("fxbench fashion: built-in MLP on Fashion-MNIST, held-out test accuracy per round")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
