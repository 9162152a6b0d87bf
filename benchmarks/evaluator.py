"""Evaluator strategies against the plain per-alpha load_state_dict loop, in one process.

Usage: python benchmarks/evaluator.py [--repeat 3] [--out benchmarks/results-cpu.md]

Workloads: the demo's spiral MLP (2x50, 5,000 test points, 51 alphas) on the whole model and on
one layer, and a small BatchNorm conv net on 512 CIFAR-shaped images. Reports the median wall time
of each method and its speed-up over the plain loop measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ckptscope.adapters.mlp import MLP
from ckptscope.data import load_data
from ckptscope.evaluate import EvalConfig, Evaluator


def plain_loop(module, a, b, keys, alphas, x, y, loss, batch_size):
    """The obvious baseline: build the state dict and load_state_dict at every alpha."""
    model = copy.deepcopy(module).eval()
    out = []
    with torch.no_grad():
        for alpha in alphas:
            model.load_state_dict(
                {
                    k: torch.lerp(a[k], b[k], float(alpha))
                    if k in keys and a[k].is_floating_point()
                    else b[k]
                    for k in a
                }
            )
            total = 0.0
            for lo in range(0, len(x), batch_size):
                o = model(x[lo : lo + batch_size])
                t = y[lo : lo + batch_size]
                total += float(
                    F.binary_cross_entropy_with_logits(o.reshape(-1), t.float(), reduction="sum")
                    if loss == "bce"
                    else F.cross_entropy(o, t, reduction="sum")
                )
            out.append(total / len(x))
    return np.array(out)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def workloads():
    torch.manual_seed(0)
    mlp = MLP([2, 50, 50, 1])
    a = {k: v.clone() for k, v in mlp.state_dict().items()}
    b = {k: v + 0.3 * torch.randn_like(v) for k, v in a.items()}
    spiral = load_data("spiral")["test"]
    yield "spiral MLP 2x50, whole model", mlp, a, b, list(a), spiral, "bce", 5000
    yield (
        "spiral MLP 2x50, layer2",
        mlp,
        a,
        b,
        ["layers.1.weight", "layers.1.bias"],
        spiral,
        "bce",
        5000,
    )
    conv = ConvNet()
    a = {k: v.clone() for k, v in conv.state_dict().items()}
    b = {
        k: (v + 0.1 * torch.randn_like(v) if v.is_floating_point() and "running" not in k else v)
        for k, v in a.items()
    }
    x, y = torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,))
    yield (
        "BN conv net, 512 CIFAR-shaped images, whole model",
        conv,
        a,
        b,
        list(a),
        (x, y),
        "ce",
        256,
    )


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def measure(name, module, a, b, keys, data, loss, bs, *, alphas, repeat) -> list[str]:
    """Table rows for one workload: the plain loop, then each ckptscope strategy."""
    x, y = data
    base_t, base = timed(lambda: plain_loop(module, a, b, keys, alphas, x, y, loss, bs), repeat)
    rows = [f"| {name} | plain load_state_dict loop | {base_t:.3f} | 1.00 | - |"]
    for strategy in ("loop", "vmap"):
        config = EvalConfig(strategy=strategy, batch_size=bs)

        def run(config=config):
            ev = Evaluator(
                module,
                a,
                b,
                {"test": (x, y)},
                loss="bce" if loss == "bce" else "cross_entropy",
                config=config,
            )
            return ev.path(keys, alphas)["test"][0]

        t, curve = timed(run, repeat)
        diff = float(np.max(np.abs(curve - base) / np.abs(base)))
        rows.append(f"| {name} | ckptscope {strategy} | {t:.3f} | {base_t / t:.2f} | {diff:.1e} |")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--alphas", type=int, default=51)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    alphas = np.linspace(0, 1, args.alphas)
    lines = [
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| workload | method | median s | speed-up vs plain loop | max rel. diff |",
        "|---|---|---|---|---|",
    ]
    for workload in workloads():
        lines += measure(*workload, alphas=alphas, repeat=args.repeat)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
