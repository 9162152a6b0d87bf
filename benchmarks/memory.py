"""Peak memory of one ``Evaluator.evaluate`` call, one fresh process per measurement.

``tracemalloc`` does not see torch's allocations, so each measurement runs in a subprocess that
builds the workload and the Evaluator, resets the kernel's high-water mark of its resident set
(``/proc/self/clear_refs``), evaluates the whole-model path, and reads ``VmHWM`` from
``/proc/self/status``. The number reported is the peak above the resident set just before the
path: what the path itself needed (replicated weights, activations, outputs). Linux only.

glibc's malloc raises its mmap threshold as large blocks are freed, after which freed
activations stay in the heap and the resident set creeps up with every chunk even though the
live tensors do not grow. ``fixed_mmap=True`` pins the threshold (``MALLOC_MMAP_THRESHOLD_``,
128 KiB) so that the measurement shows the live memory; both are reported.

Run by ``run.py``; by hand: ``python benchmarks/memory.py --workload mlp --alphas 51 --budget
33554432`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status; this measurement needs Linux.")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(workload: str, n_alpha: int, *, strategy: str, budget: int | None, batch: int | None,
            images: int) -> dict:
    """Build, evaluate the whole-model path at ``n_alpha`` points; return the peak in MiB."""
    from workloads import resnet18_cifar, spiral_mlp

    from ckptscope.engine import EvalConfig, Evaluator

    w = spiral_mlp() if workload == "mlp" else resnet18_cifar(images)
    config = EvalConfig(strategy=strategy, batch_size=batch, memory_budget=budget)
    ev = Evaluator(w.module, {"test": (w.x, w.y)}, loss=w.loss, config=config)
    keys = list(w.start)
    moving = [k for k in keys if w.start[k].is_floating_point()]
    gc.collect()
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    ev.evaluate(w.anchors(), [w.points(keys, np.linspace(0, 1, n_alpha))])
    peak = _status_kib("VmHWM")
    return {
        "workload": workload,
        "strategy": strategy,
        "alphas": n_alpha,
        "chunk": ev.chunk_size(moving, n_alpha) if strategy == "vmap" else 1,
        "batch": ev.batch_size(),
        "budget_mib": None if budget is None else budget / 2**20,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "path_peak_mib": (peak - before) / 1024 if reset else float("nan"),
    }


def measure_in_subprocess(workload: str, n_alpha: int, *, strategy: str, budget: int | None,
                          batch: int | None, images: int = 64, threads: int | None = None,
                          fixed_mmap: bool = False) -> dict:
    """Run :func:`measure` in a fresh Python process and return its result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--workload", workload,
               "--alphas", str(n_alpha), "--strategy", strategy, "--images", str(images)]
    if budget is not None:
        command += ["--budget", str(budget)]
    if batch is not None:
        command += ["--batch", str(batch)]
    if threads is not None:
        command += ["--threads", str(threads)]
    env = dict(os.environ)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement {command[2:]} failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "fixed_mmap": fixed_mmap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["mlp", "resnet18"], default="mlp")
    parser.add_argument("--alphas", type=int, required=True)
    parser.add_argument("--strategy", choices=["loop", "vmap"], default="vmap")
    parser.add_argument("--budget", type=int, default=None, help="EvalConfig.memory_budget")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--images", type=int, default=64, help="ResNet-18 images")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    print(json.dumps(measure(args.workload, args.alphas, strategy=args.strategy,
                             budget=args.budget, batch=args.batch, images=args.images)))


if __name__ == "__main__":
    main()
