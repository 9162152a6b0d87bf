"""ckptscope on one GPU: ResNet-18 throughput per strategy, the card's matmul rate, the speed-up
over a plain loop. For a session with a CUDA device; without one it says so and exits 0.

Usage:
    python benchmarks/gpu.py [--out benchmarks/results-gpu.md] [--images 2048] [--alphas 51]
                             [--block-alphas 11] [--repeat 3] [--time-limit 270] [--compile]
    python benchmarks/gpu.py --device cpu --images 16 --alphas 5 --block-alphas 5 --repeat 1
        # a smoke test of the script itself on a machine without a GPU

In one process, on CIFAR-shaped random images (``workloads.resnet18_cifar``): the fp32 (TF32
off), TF32 and bf16 matmul rates of the card (8192² matmuls); then the whole-model path and the
``--preset blocks`` sweep with the plain ``load_state_dict`` loop (also in channels-last
layout, which ckptscope uses for conv nets on CUDA), loss-landscapes (when installed), and
ckptscope's ``linear_path`` with ``auto`` (vmap on CUDA), ``loop`` and ``auto`` under bf16
autocast; on the blocks also vmap without hoisting, per group and with the groups sharing
vectorised passes (all groups in one ``Evaluator.evaluate`` call). Methods interleaved, median of
``--repeat``. Prints a markdown table and writes it to ``--out``.

``--compile`` adds the channels-last plain loop through ``torch.compile`` (default mode, and
``reduce-overhead``: CUDA graphs) on the whole-model path, to see whether compilation pays on
this card before the evaluator takes it on. Compiling costs a minute or more of the time limit
(it happens in the warm-up, which runs the whole data once so that every batch shape is
compiled before the timing); run it as a second command after the default one.

The run is sized to finish inside ``--time-limit`` seconds (default 270, for a 5-minute slot):
after the warm-up it measures the plain loop's images·α/s and lowers the α counts (never below
5) and the repeats if the plan would not fit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from measure import describe, forward_flops, matmul_rate, time_round_robin
from methods import BASELINE, TOGETHER, loss_landscapes_available, methods
from workloads import Workload, resnet18_cifar

from ckptscope.engine import EvalConfig, Evaluator

AUTO = "ckptscope linear_path, auto"
AUTO_BF16 = "ckptscope linear_path, auto, bf16 autocast"
LOOP = "ckptscope linear_path, loop"
NO_HOIST = "ckptscope Evaluator.evaluate, vmap, no hoisting"
BASELINE_CL = "plain load_state_dict loop, channels-last"
LL = "loss-landscapes linear_interpolation"
COMPILED = ["plain load_state_dict loop, channels-last, torch.compile",
            "plain load_state_dict loop, channels-last, torch.compile reduce-overhead"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def card_rates(device: torch.device) -> dict[str, float]:
    """FLOP/s of 8192² matmuls in fp32 (TF32 off), TF32 and bf16; the TF32 flag is restored."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = matmul_rate(device, torch.float32, n=8192, repeat=5, inner=5)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = matmul_rate(device, torch.float32, n=8192, repeat=5, inner=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    bf16 = matmul_rate(device, torch.bfloat16, n=8192, repeat=5, inner=20)
    return {"fp32": fp32, "tf32": tf32, "bf16": bf16}


def bench(w: Workload, n_alpha: int, names: Sequence[str], *, repeat: int, batch: int,
          device: torch.device, rates: dict[str, float]) -> list[str]:
    """Table rows for one workload."""
    alphas = np.linspace(0, 1, n_alpha)
    chosen = methods(names)
    paths = len(w.resolved_groups())
    work = len(w.x) * n_alpha * paths
    flops = forward_flops(w.module, w.x[:1]) * work
    peaks: dict[str, float] = {}

    def call(name):
        def run():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out = chosen[name](w, alphas, batch_size=batch, device=device)
            peaks[name] = (torch.cuda.max_memory_allocated(device) / 2**30
                           if device.type == "cuda" else float("nan"))
            return out

        return run

    log(f"{w.name}: {paths} path(s) x {n_alpha} α, batch {batch}, {len(chosen)} methods x "
        f"{repeat}")
    timings, results = time_round_robin({n: call(n) for n in chosen}, repeat=repeat,
                                        device=device, log=log)
    base = timings[BASELINE].median
    label = f"{w.name}, {paths} path(s) x {n_alpha} α, batch {batch}, n={repeat}"
    rows = []
    for name, timing in timings.items():
        t = timing.median
        diff = np.max(np.abs(results[name].loss - results[BASELINE].loss)
                      / np.maximum(np.abs(results[BASELINE].loss), 1e-12))
        rows.append(
            f"| {label} | {name} | {t:.3g} ({timing.spread}) | {work / t:,.0f} | {base / t:.2f} "
            f"| {100 * flops / t / rates['fp32']:.0f}% | {100 * flops / t / rates['tf32']:.0f}% "
            f"| {100 * flops / t / rates['bf16']:.0f}% | {peaks[name]:.1f} "
            f"| {'-' if name == BASELINE else f'{diff:.1e}'} |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="markdown file to write (none or '-': print only)")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--alphas", type=int, default=51)
    parser.add_argument("--block-alphas", type=int, default=11)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=270.0, help="seconds for the run")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu only to smoke-test this script with tiny sizes")
    parser.add_argument("--compile", action="store_true",
                        help="add the plain loop through torch.compile (default, reduce-overhead)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: CUDA is not available on this machine; nothing to measure. "
              "Run it on a machine with a GPU (python benchmarks/run.py covers the CPU).")
        return 0
    started = time.perf_counter()
    device = torch.device(args.device)
    info = describe(device)
    rates = card_rates(device) if device.type == "cuda" else {
        k: matmul_rate(device, dtype, n=1024, repeat=3)
        for k, dtype in (("fp32", torch.float32), ("tf32", torch.float32),
                         ("bf16", torch.bfloat16))}
    log("matmul TFLOP/s: " + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in rates.items()))

    whole = resnet18_cifar(args.images)
    blocks = resnet18_cifar(args.images, preset="blocks")
    probe = Evaluator(whole.module, {"test": (whole.x, whole.y)}, loss=whole.loss,
                      config=EvalConfig(device=device))
    batch = probe.batch_size()
    chunk = probe.chunk_size(list(whole.start), args.alphas)
    del probe

    names = [BASELINE, BASELINE_CL, LL, AUTO, LOOP, AUTO_BF16] + (COMPILED if args.compile else [])
    block_names = [BASELINE, AUTO, LOOP, NO_HOIST, TOGETHER]
    n_methods = len(methods(names))
    n_groups = len(blocks.resolved_groups())
    # Warm-up (cuDNN plans, allocator, vmap), then the plain loop's rate sizes the run.
    small = replace(whole, x=whole.x[:batch], y=whole.y[:batch])
    for name, fn in methods(names).items():
        # a compiled forward is compiled per batch shape: the whole data once covers the last one
        fn(whole if name in COMPILED else small, np.linspace(0, 1, 2 if name in COMPILED else 3),
           batch_size=batch, device=device)
    timings, _ = time_round_robin(
        {BASELINE: lambda: methods([BASELINE])[BASELINE](
            whole, np.linspace(0, 1, 5), batch_size=batch, device=device)},
        repeat=1, device=device)
    rate = args.images * 5 / timings[BASELINE].median  # images·α/s
    n_alpha, n_block, repeat = args.alphas, args.block_alphas, args.repeat

    def planned() -> float:
        # vmap is budgeted at the plain loop's rate; a slower vmap is what the limit's slack is for
        return (args.images * (n_alpha * n_methods * repeat + n_groups * n_block
                               * len(block_names)) / rate)

    left = args.time_limit - (time.perf_counter() - started) - 15
    while planned() > left and (repeat > 1 or n_alpha > 5 or n_block > 5):
        if repeat > 1:
            repeat -= 1
        else:
            n_alpha, n_block = max(5, n_alpha // 2 + 1), max(5, n_block // 2 + 1)
    log(f"plain loop {rate:,.0f} images·α/s; plan: {n_alpha} α x {repeat} repeats whole, "
        f"{n_block} α per block; ~{planned():.0f} s")

    rows = bench(whole, n_alpha, names, repeat=repeat, batch=batch, device=device, rates=rates)
    rows += bench(blocks, n_block, block_names, repeat=1, batch=batch, device=device, rates=rates)

    lines = [
        "# ckptscope on one GPU",
        "",
        "Written by `python benchmarks/gpu.py"
        + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])) + "`.",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "- matmul (8192², same process): " + ", ".join(
            f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in rates.items()),
        f"- evaluator's choice: batch {batch}, vmap chunk {chunk} α (default memory budget)",
        f"- loss-landscapes: {loss_landscapes_available() or 'not importable: its row runs '
                                                            'benchmarks/ll_reimplementation.py'}",
        f"- total run time: {time.perf_counter() - started:.0f} s",
        "",
        "| workload | method | median s (min-max) | images·α/s | × plain loop | % of fp32 matmul "
        "| % of TF32 matmul | % of bf16 matmul | peak GiB | max rel. Δloss vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "% of matmul: forward FLOPs (matmuls and convolutions, torch FlopCounterMode) × images × "
        "α × paths / the measured matmul rate, over the median wall time. ckptscope evaluates in "
        "float32; cuDNN convolutions use TF32 when `torch.backends.cudnn.allow_tf32` is on "
        "(torch's default), so the TF32 column is the fair ceiling.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out and args.out != "-":
        Path(args.out).write_text(text + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
