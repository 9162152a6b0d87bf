"""Before/after in one run: ckptscope at another commit against this tree, interleaved.

Usage:
    git -C . archive <commit> | tar -x -C /tmp/before
    python benchmarks/ab.py --before /tmp/before [--repeat 31] [--out benchmarks/results-speed.md]

Two worker processes, one importing ``ckptscope`` from ``--before`` and one from this tree
(``PYTHONPATH``), each with glibc's malloc pinned as ``run.py`` pins it, build the same
workloads (this tree's ``workloads.py`` and ``methods.py``). The parent sends one call at a
time, so only one worker runs at once, and rotates the order of the calls every repeat: a burst
of load from another process lands on every method alike. The plain loop and loss-landscapes
(the package, or ``ll_reimplementation.py`` where it is not installed) run in the "after"
worker with the batch size the "after" evaluator picks; ``linear_path`` runs with no config
in both, as a user calls it, so each side picks its own batch size.

Each row reports the median, the minimum and the 10th-90th percentile range of the wall time
of the whole call (setup included); on a shared machine the minimum is the least disturbed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LP = "ckptscope linear_path, all defaults"
# After its last parallel region a worker's OpenMP threads spin for a while (libgomp's
# GOMP_SPINCOUNT) before they sleep, and its last call has filled the caches: a call in the other
# worker started at once would share the cores and start cold. Seen at 2 threads, when the rows
# simply rotated over both workers: the ckptscope rows, which followed a call in the other
# worker, had medians 8-18% above their minimum; the plain loop's and loss-landscapes' 3%.
SWITCH_PAUSE_S = 0.05
ENGINE = "ckptscope Evaluator.evaluate, loop"


# --- the worker --------------------------------------------------------------------------------
def _workload(key: str):
    from workloads import resnet18_cifar, spiral_mlp

    if key == "small":
        return spiral_mlp(widths=(2, 64, 64, 64, 1), points=6000)
    if key == "mlp":
        return spiral_mlp()
    if key == "mlp-layers":
        return spiral_mlp(preset="layers")
    if key.startswith("resnet"):  # resnet:IMAGES
        return resnet18_cifar(int(key.split(":")[1]))
    raise KeyError(key)


def sweep_setup(pairs: int) -> dict[str, float]:
    """Seconds of setup in a ``linear_paths`` sweep over ``pairs`` pairs of the spiral MLP 2x50,
    ``--preset layers`` (3 groups and ``all``), 11 α, on the ``spiral`` data spec: the data
    load, the evaluator (model copy, probe pass) and the fx trace and splits, timed where
    ``ckptscope.linear`` and ``ckptscope.engine.evaluator`` call them; and the whole sweep."""
    import torch

    import ckptscope.engine.evaluator as engine
    import ckptscope.linear as linear
    from ckptscope.adapters import get_adapter

    spent = {"setup": 0.0}

    def timed(module, name):
        original = getattr(module, name)

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent["setup"] += time.perf_counter() - t0

        setattr(module, name, call)
        return original

    adapter = get_adapter("mlp")
    states = []
    for seed in range(pairs):
        torch.manual_seed(seed)
        a = adapter.make({"widths": [2, 50, 50, 1]}).state_dict()
        states.append((a, {k: v + 0.3 * torch.randn_like(v) for k, v in a.items()}))
    names = [(linear, "load_inputs"), (linear, "_evaluator"), (engine, "trace"),
             (engine, "split_forward")]
    originals = [timed(module, name) for module, name in names]
    try:
        t0 = time.perf_counter()
        linear.linear_paths(states, "mlp", "spiral", groups=adapter.presets["layers"](list(a)),
                            alphas=11, device="cpu")
        total = time.perf_counter() - t0
    finally:
        for (module, name), original in zip(names, originals, strict=True):
            setattr(module, name, original)
    return {"setup": spent["setup"], "total": total}


def worker() -> None:
    """Answer one JSON request per line: time one call of a method on a workload."""
    import torch
    from measure import pin_malloc
    from methods import methods

    from ckptscope.engine import EvalConfig, Evaluator

    pin_malloc()
    built: dict = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["threads"] != torch.get_num_threads():
            torch.set_num_threads(request["threads"])
        if request["workload"] == "sweep":
            print(json.dumps(sweep_setup(request["pairs"])), flush=True)
            continue
        key = request["workload"]
        if key not in built:
            built[key] = _workload(key)
        w = built[key]
        if request["method"] == "batch size":
            ev = Evaluator(w.module, {"test": (w.x, w.y)}, loss=w.loss, config=EvalConfig())
            print(json.dumps({"batch": ev.batch_size()}), flush=True)
            continue
        fn = methods([request["method"]])
        [fn] = fn.values()
        alphas = np.linspace(0, 1, request["alphas"])
        wall, cpu = time.perf_counter(), time.process_time()
        curves = fn(w, alphas, batch_size=request["batch"], device="cpu")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"wall": wall, "cpu": cpu, "loss": curves.loss.tolist(),
                          "accuracy": curves.accuracy.tolist()}), flush=True)


class Worker:
    """A worker process with ``ckptscope`` imported from ``root``."""

    def __init__(self, root: Path):
        env = {**os.environ, "PYTHONPATH": str(root)}
        for name in [k for k in env if k.startswith("MALLOC_")]:
            del env[name]
        self.root = root
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.root} died; run it by hand to see why.")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


# --- the parent --------------------------------------------------------------------------------
@dataclass
class Case:
    """One workload at one thread count."""

    workload: str
    label: str
    alphas: int
    threads: int
    repeat: int
    batch: dict[str, int] = field(default_factory=dict)  # side -> the evaluator's choice
    times: dict[str, list[float]] = field(default_factory=dict)  # row -> wall seconds
    curves: dict[str, dict] = field(default_factory=dict)  # row -> last curves


def _rows(ll: str) -> list[tuple[str, str]]:
    """(side, method) of every row."""
    return [("before", LP), ("after", LP), ("before", ENGINE), ("after", ENGINE),
            ("after", "plain load_state_dict loop"), ("after", ll)]


def run_case(case: Case, workers: dict[str, Worker], ll: str, log) -> None:
    for side, w in workers.items():
        case.batch[side] = w.ask(workload=case.workload, method="batch size",
                                 threads=case.threads)["batch"]
    rows = _rows(ll)
    batch = case.batch["after"]  # for every method that takes one (all but linear_path)

    def call(side: str, method: str) -> dict:
        return workers[side].ask(workload=case.workload, method=method, threads=case.threads,
                                 alphas=case.alphas, batch=batch)

    for row in rows:  # warm-up: allocator, oneDNN, the workload's build
        call(*row)
    sides = list(workers)
    for r in range(case.repeat):
        # Each worker's rows together, the worker that goes first alternating and the rows
        # rotating; on switching, a pause and one untimed call (the other process has just
        # filled the caches and may still be spinning), so that every timed call follows a
        # call in its own process, the plain loop's and loss-landscapes' as much as ours.
        for side in sides[r % 2:] + sides[:r % 2]:
            mine = [row for row in rows if row[0] == side]
            mine = mine[r % len(mine):] + mine[:r % len(mine)]
            time.sleep(SWITCH_PAUSE_S)
            call(*mine[-1])
            for _, method in mine:
                out = call(side, method)
                name = (f"{method} ({side})" if side == "before" or "ckptscope" in method
                        else method)
                case.times.setdefault(name, []).append(out["wall"])
                case.curves[name] = out
        log(f"  {case.label}, {_threads(case.threads)}: repeat {r + 1}/{case.repeat}")


def run_sweeps(workers: dict[str, Worker], threads: int, repeat: int, log) -> dict:
    """(side, pairs) -> the setup and total seconds of each repeat, interleaved."""
    runs: dict[tuple[str, int], list[dict]] = {}
    keys = [(side, pairs) for side in workers for pairs in (1, 10)]
    for r in range(repeat + 1):  # the first round warms up
        for side, pairs in keys[r % len(keys):] + keys[:r % len(keys)]:
            time.sleep(SWITCH_PAUSE_S)
            out = workers[side].ask(workload="sweep", pairs=pairs, threads=threads)
            if r:
                runs.setdefault((side, pairs), []).append(out)
        log(f"  sweeps, {_threads(threads)}: round {r}/{repeat}")
    return runs


def _sweep_lines(runs: dict, threads: int) -> list[str]:
    lines = [
        "",
        f"Sweeps over checkpoint pairs ({_threads(threads)}, n={len(next(iter(runs.values())))}"
        "; medians, min-max): `linear_paths` on the spiral MLP 2x50, `--preset layers` (3 "
        "groups and `all`), 11 α, data `spiral`. Setup: the data load, the evaluator (model "
        "copy, probe pass) and the fx trace and splits, summed where the sweep calls them.",
        "",
        "| ckptscope | pairs | setup s | whole sweep s |",
        "|---|---|---|---|",
    ]
    order = sorted(runs, key=lambda key: (key[0] != "before", key[1]))  # before first
    for side, pairs in order:
        outs = runs[side, pairs]
        setup = [o["setup"] for o in outs]
        total = [o["total"] for o in outs]
        lines.append(f"| {side} | {pairs} | {statistics.median(setup):.4f} ({min(setup):.4f}-"
                     f"{max(setup):.4f}) | {statistics.median(total):.3f} ({min(total):.3f}-"
                     f"{max(total):.3f}) |")
    return lines


def _paired(reference: Sequence[float], times: Sequence[float]) -> str:
    """The median (10th-90th percentile) over the repeats of reference[r] / times[r]."""
    ratios = np.asarray(reference) / np.asarray(times)
    return (f"{np.median(ratios):.2f} ({_quantile(ratios, 0.1):.2f}-"
            f"{_quantile(ratios, 0.9):.2f})")


def _threads(n: int) -> str:
    return f"{n} thread{'s' * (n > 1)}"


def _quantile(values: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q))


def render(cases: list[Case], info: dict[str, str], command: str,
           sweeps: dict | None = None, sweep_threads: int = 1) -> str:
    lines = [
        "# ckptscope before and after, one run",
        "",
        f"Written by `{command}`. What the numbers mean: [docs/performance.md]"
        "(../docs/performance.md#small-models-at-the-default-thread-count).",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "| workload | threads | method | batch | median s | min s | p10-p90 s "
        "| × plain loop, paired: median (p10-p90) | × plain loop, min / min "
        "| max rel. Δloss vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        plain = case.times["plain load_state_dict loop"]
        base = np.asarray(case.curves["plain load_state_dict loop"]["loss"])
        for name, times in case.times.items():
            side = "before" if name.endswith("(before)") else "after"
            batch = case.batch[side] if "ckptscope linear_path" in name else case.batch["after"]
            loss = np.asarray(case.curves[name]["loss"])
            delta = float(np.max(np.abs(loss - base) / np.maximum(np.abs(base), 1e-12)))
            lines.append(
                f"| {case.label} | {case.threads} | {name} | {batch} "
                f"| {statistics.median(times):.4f} | {min(times):.4f} "
                f"| {_quantile(times, 0.1):.4f}-{_quantile(times, 0.9):.4f} "
                f"| {_paired(plain, times)} | {min(plain) / min(times):.2f} | {delta:.1e} |"
            )
    lines += [
        "",
        "Times are wall seconds of the whole call (setup included), the two workers and all "
        "methods interleaved; n below. × plain loop > 1 is faster; \"paired\" is the ratio "
        "within each repeat (the calls of one repeat run within a second of each other, so a "
        "burst of load from another process lands on both), summarised over the repeats. "
        "`(before)` / `(after)`: ckptscope from the `--before` tree / from this tree. The plain "
        "loop, loss-landscapes and the engine rows use the batch the after evaluator picks; "
        "`linear_path` picks its own.",
        "",
    ]
    for case in cases:
        after, before = case.times[f"{LP} (after)"], case.times[f"{LP} (before)"]
        ll = next(times for name, times in case.times.items() if "loss-landscapes" in name)
        lines.append(
            f"- {case.label}, {_threads(case.threads)}, n={case.repeat}: linear_path before / "
            f"after, paired {_paired(before, after)}, min / min "
            f"{min(before) / min(after):.2f}; loss-landscapes / linear_path after, paired "
            f"{_paired(ll, after)}, min / min {min(ll) / min(after):.2f} (> 1: after is faster)."
        )
    if sweeps:
        lines += _sweep_lines(sweeps, sweep_threads)
    return "\n".join(lines) + "\n"


CASES = {  # key -> (workload, label, alphas, repeats as a share of --repeat)
    "small": ("small", "MLP 3x64, 6,000 points, whole, 41 α", 41, 1.0),
    "mlp": ("mlp", "MLP 2x50, 5,000 points, whole, 51 α", 51, 1.0),
    "mlp-layers": ("mlp-layers", "MLP 2x50, 5,000 points, 3 layers x 51 α", 51, 0.5),
    "resnet": ("resnet:64", "ResNet-18, 64 images, whole, 3 α", 3, 0.2),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", type=Path, help="a tree with ckptscope/ at the old commit")
    parser.add_argument("--before-label", default=None,
                        help="what --before is, for the report (e.g. its commit)")
    parser.add_argument("--repeat", type=int, default=31)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts (default: torch's default, then 1)")
    parser.add_argument("--only", nargs="+", choices=[*CASES, "sweep"],
                        default=[*CASES, "sweep"])
    parser.add_argument("--out", default="-", help="markdown file to write ('-': print only)")
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return
    if args.before is None or not (args.before / "ckptscope").is_dir():
        parser.error("--before must be a tree that holds ckptscope/ (git archive COMMIT | tar -x)")
    import torch
    from measure import describe
    from methods import loss_landscapes_method

    threads = args.threads or list(dict.fromkeys((torch.get_num_threads(), 1)))
    info = describe(torch.device("cpu"))
    info["torch threads"] = ", ".join(map(str, threads)) + " (per row)"
    info["before"] = f"{args.before} ({args.before_label or _commit(args.before)})"
    info["after"] = f"{ROOT} ({_commit(ROOT)})"
    ll = loss_landscapes_method()
    workers = {"before": Worker(args.before.resolve()), "after": Worker(ROOT)}
    started = time.perf_counter()
    cases, sweeps = [], None

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        for key in [k for k in args.only if k in CASES]:
            workload, label, alphas, share = CASES[key]
            for n in threads:
                case = Case(workload, label, alphas, n, max(3, round(args.repeat * share)))
                run_case(case, workers, ll, log)
                cases.append(case)
        if "sweep" in args.only:
            sweeps = run_sweeps(workers, threads[-1], max(3, args.repeat // 4), log)
    finally:
        for w in workers.values():
            w.close()
    info["load average (1, 5, 15 min) at end"] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    info["total run time"] = f"{(time.perf_counter() - started) / 60:.1f} min"
    command = "python benchmarks/ab.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = render(cases, info, command, sweeps, threads[-1])
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)


def _commit(tree: Path) -> str:
    """The tree's git commit, or ``"not a git checkout"``."""
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else "not a git checkout"


if __name__ == "__main__":
    main()
