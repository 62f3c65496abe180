"""Compare finished runs of train.py: a Markdown table of their last epoch and one plot of
validation mIoU per epoch.

    python examples/segmentation/compare.py runs/bn runs/syncbn runs/sn runs/syncsn \\
        --output docs/segmentation_norms.png

Each run is an --output-dir of train.py; it is labelled with the --norm it was trained with.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

import torch
from utils import read_jsonl

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def load_run(path: str) -> tuple[str, list[dict]]:
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    if not rows:
        raise SystemExit(f"{path}: no metrics.jsonl with at least one epoch")
    ckpt = os.path.join(path, "checkpoint.pth")
    label = os.path.basename(os.path.normpath(path))
    if os.path.isfile(ckpt):
        args = torch.load(ckpt, map_location="cpu", weights_only=True)["args"]
        label = "BN->SyncSN" if args.get("convert") else args["norm"]
    return label, rows


def plot_miou(
    ax: Axes,
    label: str,
    epochs: list[int],
    miou: list[float],
    band: tuple[list[float], list[float]] | None = None,
    color: str | None = None,
) -> None:
    """One mIoU-per-epoch curve on a matplotlib ``ax``; ``band`` (low, high) per epoch is
    shaded behind it (the spread over seeds in study.py)."""
    (line,) = ax.plot(epochs, miou, "o-", label=label, color=color)
    if band is not None:
        ax.fill_between(epochs, band[0], band[1], color=line.get_color(), alpha=0.18, lw=0)


def style_miou_axes(ax: Axes, title: str) -> None:
    """Labels, integer epoch ticks and a light grid for mIoU-per-epoch curves."""
    from matplotlib.ticker import MaxNLocator

    ax.set(xlabel="epoch", ylabel="validation mIoU", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="output directories of train.py")
    p.add_argument("--output", default=None, help="PNG file for the mIoU curves")
    args = p.parse_args()
    runs = [load_run(r) for r in args.runs]

    print("| norm | final mIoU | pixel acc | train loss | images/s |")
    print("|---|---|---|---|---|")
    for label, rows in runs:
        last = rows[-1]
        print(
            f"| {label} | {last['miou']:.3f} | {last['pixel_acc']:.3f} | "
            f"{last['train_loss']:.3f} | {last['images_per_sec']:.1f} |"
        )

    if args.output:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for label, rows in runs:
            plot_miou(ax, label, [r["epoch"] for r in rows], [r["miou"] for r in rows])
        style_miou_axes(ax, "mIoU per epoch")
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        fig.savefig(args.output, dpi=100)
        print(f"plot written to {args.output}")


if __name__ == "__main__":
    main()
