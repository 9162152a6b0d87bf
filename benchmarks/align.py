"""Speed of weight matching: two ResNet-18s (random init, different seeds) on this machine.

Usage: python benchmarks/align.py [--threads N] [--repeats 3] [--out benchmarks/results-align.md]

Times, per model, the permutation spec from the fx graph and weight matching (wall and process
CPU seconds, sweeps, classes solved), and activation matching of the MLP on the digits. The
models: CIFAR ResNet-18 (11.2 M parameters, 12 classes), ResNet-50 (23.5 M, 37 classes),
VGG-11-BN (9.2 M, 8 classes) and the 3x512 MLP of ``reproduce rebasin``. Appends a dated section
to the output file with the machine's load, since the shared CPU's load changes wall times.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ckptscope.adapters.mlp import MLP
from ckptscope.adapters.resnet import resnet18, resnet50
from ckptscope.adapters.vgg import VGG
from ckptscope.align.spec import spec_from_graph
from ckptscope.align.weights import weight_matching

MODELS = {
    "ResNet-18 (CIFAR, width 64)": resnet18,
    "ResNet-50 (CIFAR, width 64)": resnet50,
    "VGG-11-BN (CIFAR)": lambda: VGG(batchnorm=True),
    "MLP 64-512-512-512-10": lambda: MLP([64, 512, 512, 512, 10]),
}


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, build, repeats: int) -> dict:
    torch.manual_seed(0)
    a = build().state_dict()
    torch.manual_seed(1)
    b = build().state_dict()
    spec, spec_wall, _ = _timed(lambda: spec_from_graph(build()))
    walls, cpus = [], []
    for _ in range(repeats):
        found, wall, cpu = _timed(lambda: weight_matching(spec, a, b, seed=0))
        walls.append(wall)
        cpus.append(cpu)
    params = sum(v.numel() for v in a.values() if v.is_floating_point())
    return {"model": name, "params": params, "classes": len(spec.classes), "spec_s": spec_wall,
            "wall": sorted(walls), "cpu": sorted(cpus), "sweeps": found.sweeps,
            "before": found.objective_before, "after": found.objective_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", default=str(Path(__file__).with_name("results-align.md")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows = [measure(name, MODELS[name], args.repeats) for name in args.models]
    load_end = os.getloadavg()
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical "
        f"cores, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)",
        f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.1f}' for x in load_start)}; "
        f"at end: {', '.join(f'{x:.1f}' for x in load_end)}",
        f"- `python benchmarks/align.py --repeats {args.repeats}"
        f"{f' --threads {args.threads}' if args.threads else ''}`",
        "",
        "| model | parameters | classes | spec (s) | weight matching wall s, median (min-max) "
        "| CPU s, median | sweeps | objective before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        med = len(r["wall"]) // 2
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['classes']} | {r['spec_s']:.2f} | "
            f"{r['wall'][med]:.2f} ({r['wall'][0]:.2f}-{r['wall'][-1]:.2f}) | "
            f"{r['cpu'][med]:.2f} | {r['sweeps']} | {r['before']:.5g} -> {r['after']:.5g} |")
    text = "\n".join(lines) + "\n\n"
    out = Path(args.out)
    if not out.exists():
        text = ("# Weight matching speed\n\nWritten by `benchmarks/align.py` (each run appends a "
                "section). Random inits from seeds 0 and 1; CPU s is the process's CPU time "
                "summed over its threads.\n\n") + text
    with open(out, "a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
