"""ckptscope's CPU benchmarks in one command: speed against a plain loop and loss-landscapes, the
arithmetic floor, and peak memory against the number of alphas.

Usage:
    python benchmarks/run.py [--quick] [--threads N] [--out benchmarks/README.md]

Everything runs in this one process (memory: one subprocess per point), so the ratios compare
methods under the same conditions; methods are interleaved round-robin over the repeats and the
median is reported. See ``docs/performance.md`` for what the columns mean.

Workloads (``benchmarks/workloads.py``):
- the spiral MLP 2x50 on 5,000 points, 51 alphas: whole model, and ``--preset layers``;
- a small MLP, 3x64 on 6,000 spiral points, 41 alphas, whole model, at torch's default thread
  count and at one thread, whatever ``--threads`` says (section ``mlp-small``);
- ResNet-18 on 512 CIFAR-shaped images: whole model, and ``--preset blocks`` (6 group paths).
A full 51-alpha ResNet-18 run is hours on two CPU cores; ``--quick`` uses 5 alphas on the whole
model and 3 per block, and the script prints its estimate before each section.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from measure import (
    Timing,
    conv_rate,
    describe,
    fma_peak,
    forward_flops,
    matmul_rate,
    pin_malloc,
    time_round_robin,
)
from memory import measure_in_subprocess
from methods import (
    BASELINE,
    DEFAULTS,
    LL_REIMPLEMENTED,
    TOGETHER,
    Curves,
    loss_landscapes_available,
    loss_landscapes_method,
    methods,
)
from workloads import Workload, resnet18_cifar, spiral_mlp

from ckptscope.engine import EvalConfig, Evaluator

HERE = Path(__file__).resolve().parent
AUTO = "ckptscope linear_path, auto"
LL = "loss-landscapes linear_interpolation"
MLP_METHODS = [BASELINE, LL, AUTO, "ckptscope linear_path, loop", "ckptscope linear_path, vmap",
               "ckptscope Evaluator.evaluate, loop", "ckptscope Evaluator.evaluate, vmap"]
# On the CPU auto resolves to loop, so the ResNet sections time auto and vmap only (each run of a
# method is minutes there). ckptscope runs conv nets channels-last and the CPU has AVX512-BF16
# units, so the plain loop is timed in that layout too, and both under bf16 autocast: the rows
# tell layout and precision from strategy.
CL = "plain load_state_dict loop, channels-last"
BF16 = "ckptscope linear_path, auto, bf16 autocast"
RESNET_METHODS = [BASELINE, CL, LL, AUTO, "ckptscope linear_path, vmap",
                  "plain load_state_dict loop, channels-last, bf16 autocast", BF16]
SMALL_METHODS = [BASELINE, LL, DEFAULTS, "ckptscope Evaluator.evaluate, loop"]
SECTIONS = ("mlp", "mlp-layers", "mlp-small", "resnet", "resnet-blocks", "chunks", "memory")
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before --threads changes it


@dataclass(frozen=True)
class Profile:
    """How much to run."""

    repeat: int  # MLP repeats
    resnet_repeat: int
    resnet_alphas: int
    blocks_alphas: int
    memory_mlp: tuple[int, ...]
    memory_resnet: tuple[int, ...]
    blocks_methods: tuple[str, ...] = (BASELINE, AUTO, "ckptscope linear_path, vmap")


PROFILES = {
    "quick": Profile(repeat=21, resnet_repeat=1, resnet_alphas=5, blocks_alphas=3,
                     memory_mlp=(1, 2, 5, 10, 20, 51, 204), memory_resnet=(1, 3, 6, 12),
                     blocks_methods=(BASELINE, CL, LL, AUTO, "ckptscope linear_path, vmap",
                                     BF16)),
    "full": Profile(repeat=21, resnet_repeat=1, resnet_alphas=51, blocks_alphas=51,
                    memory_mlp=(1, 2, 5, 10, 20, 51, 204, 816),
                    memory_resnet=(1, 2, 3, 6, 12, 24, 51),
                    blocks_methods=(BASELINE, CL, LL, AUTO, "ckptscope linear_path, vmap",
                                    "ckptscope Evaluator.evaluate, loop, no hoisting", BF16)),
}


@dataclass
class Row:
    workload: str
    method: str
    timing: Timing
    examples_alphas: int  # examples x alphas x paths
    floor_s: float
    loss_diff: float  # max relative |loss - plain loop|
    acc_diff: float  # max |accuracy - plain loop|
    per_group: list[float] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


class Bench:
    """Runs the sections, keeps the matmul-rate samples and the rows."""

    def __init__(self, profile: Profile, device: torch.device):
        self.profile = profile
        self.device = device
        self.rates: list[float] = []  # fp32 matmul FLOP per CPU second
        self.wall_rates: list[float] = []
        self.conv_rates: list[float] = []
        self.peak: tuple[float | None, str] = (None, "not run")  # measure.fma_peak()
        self.rows: list[Row] = []
        self.group_rows: list[tuple[str, list[str], dict[str, list[float]]]] = []
        self.chunk_rows: list[tuple[str, int, Timing]] = []
        self.memory_rows: list[dict] = []
        self.notes: list[str] = []

    # --- the matmul floor --------------------------------------------------------------------
    def sample_rate(self) -> float:
        """Measure the fp32 matmul rate again (it moves with the load on a shared machine).

        The floor uses CPU time, like the methods' CPU seconds: time slices lost to other
        processes then count against neither.
        """
        self.rates.append(matmul_rate(self.device, torch.float32, n=2048, repeat=5, clock="cpu"))
        self.wall_rates.append(matmul_rate(self.device, torch.float32, n=2048, repeat=3))
        self.conv_rates.append(conv_rate(self.device, clock="cpu"))
        return self.rate

    @property
    def rate(self) -> float:
        return float(np.median(self.rates))

    # --- speed -------------------------------------------------------------------------------
    def batch_size(self, w: Workload) -> int:
        """The batch the evaluator picks by itself; every method is given the same one."""
        ev = Evaluator(w.module, {"test": (w.x, w.y)}, loss=w.loss,
                       config=EvalConfig(device=self.device))
        return ev.batch_size()

    def speed(self, w: Workload, n_alpha: int, names: Sequence[str], repeat: int,
              threads: int | None = None) -> None:
        """Time the methods on ``w``; ``threads``: torch's thread count for this section only
        (named in the rows' label)."""
        if threads is not None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                self.speed(replace(w, name=f"{w.name}, {threads} thread{'s' * (threads > 1)}"),
                           n_alpha, names, repeat)
            finally:
                torch.set_num_threads(before)
            return
        alphas = np.linspace(0, 1, n_alpha)
        chosen = methods(names)
        batch = self.batch_size(w)
        paths = w.resolved_groups()
        flops = forward_flops(w.module, w.x[:1]) * len(w.x) * n_alpha * len(paths)
        estimate = flops / self.sample_rate() * len(chosen) * repeat / 0.8
        log(f"{w.name}: {len(paths)} path(s) x {n_alpha} alphas, batch {batch}, "
            f"{len(chosen)} methods x {repeat} repeats; estimate ~{estimate / 60:.1f} min")

        # Warm up every method on one batch, whole model, two alphas (allocator, oneDNN, vmap).
        small = replace(w, x=w.x[:batch], y=w.y[:batch], groups={})
        for fn in chosen.values():
            fn(small, np.linspace(0, 1, 2), batch_size=batch, device=self.device)

        marks: dict[str, list[float]] = {name: [] for name in chosen}

        def call(name: str, fn: Callable[..., Curves]) -> Callable[[], Curves]:
            def run() -> Curves:
                stamps = [time.perf_counter()]
                curves = fn(w, alphas, batch_size=batch, device=self.device,
                            mark=lambda g: stamps.append(time.perf_counter()))
                marks[name] = list(np.diff(stamps))
                return curves

            return run

        timings, results = time_round_robin(
            {name: call(name, fn) for name, fn in chosen.items()},
            repeat=repeat, device=self.device, log=log,
        )
        self.sample_rate()
        base = results[BASELINE]
        label = f"{w.name}, {len(paths)} path(s) x {n_alpha} α, batch {batch}, n={repeat}"
        for name, timing in timings.items():
            curves = results[name]
            self.rows.append(Row(
                workload=label,
                method=name,
                timing=timing,
                examples_alphas=len(w.x) * n_alpha * len(paths),
                floor_s=flops / self.rate,
                loss_diff=max_rel(curves.loss, base.loss),
                acc_diff=float(np.max(np.abs(curves.accuracy - base.accuracy))),
            ))
        if len(paths) > 1:
            self.group_rows.append((label, [p.name for p in paths], marks))
        ll, auto = loss_landscapes_method(), AUTO if AUTO in results else DEFAULTS
        if ll in results and auto in results:
            ours, theirs = results[auto], results[ll]
            at_end = max_rel(theirs.loss[:, -1], ours.loss[:, -1])
            acc = np.max(np.abs(theirs.accuracy - ours.accuracy))
            self.notes.append(
                f"{w.name}: loss-landscapes vs ckptscope, max relative |Δloss| "
                f"{max_rel(theirs.loss, ours.loss):.1e} (at α = 1: {at_end:.1e}), "
                f"max |Δaccuracy| {acc:.1e}."
            )

    def chunks(self, w: Workload, n_alpha: int, budgets: Sequence[int | None]) -> None:
        """vmap time against its chunk size (set through memory_budget), and the loop beside it."""
        alphas = np.linspace(0, 1, n_alpha)
        batch = self.batch_size(w)
        keys = list(w.start)
        moving = [k for k in keys if w.start[k].is_floating_point()]
        calls, chunk_of = {}, {}
        for budget in budgets:
            config = EvalConfig(device=self.device, strategy="vmap", batch_size=batch,
                                memory_budget=budget)
            ev = Evaluator(w.module, {"test": (w.x, w.y)}, loss=w.loss, config=config)
            name = f"vmap, budget {'default' if budget is None else f'{budget >> 20} MiB'}"
            chunk_of[name] = ev.chunk_size(moving, n_alpha)
            calls[name] = lambda ev=ev: ev.evaluate(w.anchors(), [w.points(keys, alphas)])
        loop = Evaluator(w.module, {"test": (w.x, w.y)}, loss=w.loss,
                         config=EvalConfig(device=self.device, strategy="loop", batch_size=batch))
        calls["loop"] = lambda: loop.evaluate(w.anchors(), [w.points(keys, alphas)])
        chunk_of["loop"] = 1
        for fn in calls.values():
            fn()
        log(f"{w.name}: vmap chunk sweep")
        timings, _ = time_round_robin(calls, repeat=self.profile.repeat, device=self.device,
                                      log=log)
        for name, timing in timings.items():
            self.chunk_rows.append((name, chunk_of[name], timing))

    # --- memory ------------------------------------------------------------------------------
    def memory(self, threads: int | None) -> None:
        """vmap's peak against the number of alphas, with a budget that forces chunking."""
        cases = [("mlp", n, "vmap") for n in self.profile.memory_mlp]
        cases.append(("mlp", max(self.profile.memory_mlp), "loop"))
        cases += [("resnet18", n, "vmap") for n in self.profile.memory_resnet]
        cases.append(("resnet18", max(self.profile.memory_resnet), "loop"))
        for workload, n, strategy in cases:
            log(f"memory: {workload}, {strategy}, {n} alphas")
            options = (dict(budget=32 << 20, batch=None) if workload == "mlp"
                       else dict(budget=1 << 30, batch=32, images=32))
            default, fixed = (
                measure_in_subprocess(workload, n, strategy=strategy, threads=threads,
                                      fixed_mmap=fixed_mmap, **options)
                for fixed_mmap in (False, True)
            )
            self.memory_rows.append({**default, "path_peak_fixed_mib": fixed["path_peak_mib"]})


# --- markdown --------------------------------------------------------------------------------
def _speed_table(rows: list[Row]) -> list[str]:
    lines = [
        "| workload | method | median s (min-max) | CPU s | examples·α/s | × plain loop "
        "(wall / CPU) | % of matmul floor (CPU time) | max rel. Δloss vs plain "
        "| max Δacc vs plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r.workload: r for r in rows if r.method == BASELINE}
    for r in rows:
        b = base[r.workload]
        lines.append(
            f"| {r.workload} | {r.method} | {r.timing.median:.3g} ({r.timing.spread}) "
            f"| {r.timing.median_cpu:.3g} | {r.examples_alphas / r.timing.median:,.0f} "
            f"| {b.timing.median / r.timing.median:.2f} / "
            f"{b.timing.median_cpu / r.timing.median_cpu:.2f} "
            f"| {100 * r.floor_s / r.timing.median_cpu:.0f}% "
            f"| {'-' if r.method == BASELINE else f'{r.loss_diff:.1e}'} "
            f"| {'-' if r.method == BASELINE else f'{r.acc_diff:.1e}'} |"
        )
    return lines


def _group_tables(group_rows) -> list[str]:
    lines = []
    for label, names, marks in group_rows:
        methods_ = list(marks)
        lines += [f"Per group, seconds (last repeat; the first group includes setup) — {label}:",
                  "", "| group | " + " | ".join(methods_) + " |",
                  "|---|" + "---|" * len(methods_)]
        for g, name in enumerate(names):
            cells = [f"{marks[m][g]:.2f}" if g < len(marks[m]) else "-" for m in methods_]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _chunk_table(chunk_rows) -> list[str]:
    lines = ["| spiral MLP, whole model, 51 α | chunk (α per pass) | median s (min-max) |",
             "|---|---|---|"]
    for name, chunk, timing in chunk_rows:
        lines.append(f"| {name} | {chunk} | {timing.median:.3g} ({timing.spread}) |")
    return lines


def _memory_table(memory_rows) -> list[str]:
    lines = ["| workload | strategy | α's | chunk | batch | budget MiB | path peak MiB, glibc "
             "default | path peak MiB, mmap threshold 128 KiB | process peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in memory_rows:
        name = "spiral MLP, 5,000 points" if m["workload"] == "mlp" else "ResNet-18, 32 images"
        lines.append(
            f"| {name} | {m['strategy']} | {m['alphas']} | {m['chunk']} | {m['batch']} "
            f"| {m['budget_mib']:.0f} | {m['path_peak_mib']:.1f} | {m['path_peak_fixed_mib']:.1f} "
            f"| {m['peak_mib']:.0f} |"
        )
    return lines


def render(bench: Bench, info: dict[str, str], command: str) -> str:
    lines = [
        "# ckptscope benchmarks",
        "",
        f"Written by `{command}`; rerun it to refresh this file. What the numbers mean, and what",
        "we read from them: [docs/performance.md](../docs/performance.md).",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- fp32 matmul (2048², same process): median {bench.rate / 1e9:.1f} GFLOP per CPU "
        f"second over {len(bench.rates)} samples ({min(bench.rates) / 1e9:.1f}-"
        f"{max(bench.rates) / 1e9:.1f}); per wall second "
        f"{np.median(bench.wall_rates) / 1e9:.1f} ({min(bench.wall_rates) / 1e9:.1f}-"
        f"{max(bench.wall_rates) / 1e9:.1f})",
        f"- fp32 3x3 convolution (256 channels, 16x16, batch 32): median "
        f"{np.median(bench.conv_rates) / 1e9:.1f} GFLOP per CPU second (for context: a ResNet "
        "can beat the matmul floor where the convolutions outrun the matmul)",
        f"- fp32 peak of one core (`benchmarks/fma_peak.c`; {bench.peak[1]}): "
        + (f"{bench.peak[0] / 1e9:.1f} GFLOP/s; a row's share of it is its % of matmul floor × "
           f"{bench.rate / bench.peak[0]:.2f}" if bench.peak[0] else "not measured"),
        "",
    ]
    if bench.rows:
        lines += ["## Speed", "", *_speed_table(bench.rows), ""]
        lines += [
            "- median s: wall time of the whole call (setup included) over n repeats, methods "
            "interleaved; CPU s: the process's CPU time. × plain loop: plain loop time / this "
            "time (> 1 is faster).",
            "- % of matmul floor: (forward FLOPs of one example × examples × α × paths) / the fp32 "
            "matmul rate above, as a share of the median CPU time. FLOPs count matmuls and "
            "convolutions only (torch FlopCounterMode), and a hoisted group path skips part of "
            "them, so it can pass 100%.",
            "- Δ columns: against the plain loop's curves (loss relative, accuracy absolute).",
            "",
        ]
    if bench.notes:
        lines += ["loss-landscapes' curve against ours:", "", *[f"- {n}" for n in bench.notes], ""]
    if bench.group_rows:
        lines += ["## Group sweeps", "", *_group_tables(bench.group_rows)]
    if bench.chunk_rows:
        lines += ["## vmap chunk size (CPU)", "", *_chunk_table(bench.chunk_rows), ""]
    if bench.memory_rows:
        lines += ["## Peak memory against the number of α's", "", *_memory_table(bench.memory_rows),
                  "",
                  "Each number is a fresh process: the peak resident set (VmHWM) during "
                  "`Evaluator.evaluate` above the resident set just before it. The budget "
                  "(`EvalConfig.memory_budget`) fixes the chunk. With glibc's default malloc the "
                  "resident set creeps up chunk after chunk (freed blocks stay in the heap once "
                  "the dynamic mmap threshold has risen); with the threshold pinned "
                  "(`MALLOC_MMAP_THRESHOLD_=131072`) the live memory is flat beyond one chunk.",
                  ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="5 α's on ResNet-18 (3 per block) instead of 51")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is steadiest on a shared machine")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--resnet-images", type=int, default=512)
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc thresholds at their defaults (noisier)")
    parser.add_argument("--out", default=str(HERE / "README.md"),
                        help="markdown file to write ('-': print only)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES["quick" if args.quick else "full"]
    device = torch.device("cpu")
    malloc = "glibc defaults (--default-malloc)" if args.default_malloc else pin_malloc()
    info = describe(device)
    info["malloc"] = malloc
    if loss_landscapes_available() is None:
        info["loss-landscapes"] += (
            f" (cannot be imported: its rows are {LL_REIMPLEMENTED!r}, "
            "benchmarks/ll_reimplementation.py)")
    bench = Bench(profile, device)
    bench.sample_rate()
    bench.peak = fma_peak()
    started = time.perf_counter()

    if "mlp" in args.only:
        bench.speed(spiral_mlp(), 51, MLP_METHODS, profile.repeat)
    if "mlp-layers" in args.only:
        bench.speed(spiral_mlp(preset="layers"), 51,
                    [BASELINE, LL, AUTO, "ckptscope linear_path, vmap",
                     "ckptscope Evaluator.evaluate, loop, no hoisting",
                     TOGETHER], profile.repeat)
    if "mlp-small" in args.only:  # at torch's default thread count, and at one thread
        small = spiral_mlp(widths=(2, 64, 64, 64, 1), points=6000)
        for threads in dict.fromkeys((DEFAULT_THREADS, 1)):
            bench.speed(small, 41, SMALL_METHODS, profile.repeat, threads=threads)
    if "chunks" in args.only:
        bench.chunks(spiral_mlp(), 51, [2 << 20, 8 << 20, 32 << 20, None])
    if "resnet" in args.only:
        bench.speed(resnet18_cifar(args.resnet_images), profile.resnet_alphas, RESNET_METHODS,
                    profile.resnet_repeat)
    if "resnet-blocks" in args.only:
        bench.speed(resnet18_cifar(args.resnet_images, preset="blocks"), profile.blocks_alphas,
                    list(profile.blocks_methods), profile.resnet_repeat)
    if "memory" in args.only:
        bench.memory(args.threads)

    info["load average (1, 5, 15 min) at end"] = ", ".join(
        f"{v:.1f}" for v in os.getloadavg())
    info["total run time"] = f"{(time.perf_counter() - started) / 60:.1f} min"
    command = "python benchmarks/run.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    text = render(bench, info, command)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text + "\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
