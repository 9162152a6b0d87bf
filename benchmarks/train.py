"""Training throughput of the companion trainer on this machine (images per second).

Usage: python benchmarks/train.py [--threads 1] [--out benchmarks/results-train.md]

Trains the CPU-sized recipes for a few epochs (the spiral and digits MLPs of Fig. 1A and the
6-hidden-layer MLPs of Fig. A17) and a few steps of the ResNet-18 CIFAR-10 recipe on CIFAR-shaped
random images (written to a temporary folder in the python-batch format), and reports the
trainer's own images/s. On a GPU machine pass --device cuda (and --amp) for the ResNet-18 figure.
"""

from __future__ import annotations

import argparse
import pickle
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ckptscope.train import load_recipe, run

CPU_RECIPES = {  # recipe -> overrides that keep each measurement to seconds
    "mlp-spiral-fig1a": {"epochs": 5},
    "mlp-digits-fig1a": {"epochs": 5},
    "mlp6-spiral-50": {"epochs": 3},
    "mlp6-spiral-500": {"epochs": 1},
}


def fake_cifar(root: Path, n: int) -> Path:
    """CIFAR-10's python batches with random pixels (n images per batch file)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def measure(name: str, overrides: dict, *, data_dir=None, device="cpu", amp=False,
            channels_last=None) -> float:
    recipe = replace(load_recipe(name), **overrides)
    with tempfile.TemporaryDirectory() as out:
        result = run(recipe, seed=0, out=out, data_dir=data_dir, device=device, amp=amp,
                     channels_last=channels_last)
    return result.images_per_second


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    rows = []
    for name, overrides in CPU_RECIPES.items():
        rows.append((name, overrides, measure(name, overrides, device=args.device)))
    with tempfile.TemporaryDirectory() as tmp:
        root = fake_cifar(Path(tmp), 256)
        overrides = {"epochs": 1, "train_examples": 512}
        # the default layout (channels-last for a conv net), then the other one, in one process
        for label, layout in (("", None), (", channels_last=False", False)):
            rows.append((f"resnet18-cifar10{label}", overrides,
                         measure("resnet18-cifar10", overrides, data_dir=root,
                                 device=args.device, amp=args.amp, channels_last=layout)))
    lines = [
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, device {args.device}{' (bf16 autocast)' if args.amp else ''}, "
        f"{time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s in all",
        "",
        "| recipe | settings | images/s |",
        "|---|---|---|",
        *[f"| {name} | {overrides} | {rate:,.0f} |" for name, overrides, rate in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
