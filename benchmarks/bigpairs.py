"""Peak anonymous memory of ``linear_path`` on a generated pair of ~300M-parameter checkpoints.

A stack of ``depth`` Linear(width, width) layers with ReLUs between them (default 18 x 4096:
302M parameters, 1.21 GB per float32 state) is written twice as safetensors, a start and an end
near it, in float32 and in bfloat16, to a temporary folder. Each measurement is a fresh child
process that evaluates the whole-model path and one group path on three alphas over 16 examples
(activations: a few hundred KB) and reports:

- ``peak anon``: the largest ``RssAnon`` (``/proc/self/status``) a sampling thread saw (every
  millisecond) above its value just before the call: the process's own memory, which the kernel
  cannot drop. Memory-mapped checkpoint pages are file-backed (``RssFile``): the kernel reads
  them back from the file when it needs the room, so they are not counted here;
- ``peak RSS``: ``VmHWM`` above the resident set before the call (reset with
  ``/proc/self/clear_refs``), file-backed pages included, for comparison;
- both as multiples of one float32 state.

The model is given as an adapter (``bigpairs:build``, as ``--adapter pkg.module:attr`` on the
command line), so ckptscope builds it; ``--model module`` passes an ``nn.Module`` built on the
CPU by the caller (not counted: it is the caller's), ``--model meta`` one built on the meta
device. ``--code DIR`` runs the children on the ckptscope at ``DIR`` (the "before" numbers:
``--code /work/main``).

Run: ``python benchmarks/bigpairs.py --code /work/main --out before.json`` then without
``--code`` (this checkout); ``--report`` turns the JSON files into results-bigpairs.md's table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
WIDTH, DEPTH, EXAMPLES = 4096, 18, 16


def build(width: int = WIDTH, depth: int = DEPTH) -> nn.Module:
    """The benchmark's model: ``depth`` Linear(width, width) layers, ReLU between them.

    Keys ``0.weight``, ``0.bias``, ``2.weight``, ... (nn.Sequential's numbering).
    """
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def n_params(width: int = WIDTH, depth: int = DEPTH) -> int:
    return depth * (width * width + width)


def write_pair(folder: Path, dtype: torch.dtype, *, width: int = WIDTH,
               depth: int = DEPTH) -> tuple[Path, Path]:
    """Write ``start`` and ``end`` (start plus 10% noise) in ``dtype``; tensor i from seed i."""
    from safetensors.torch import save_file

    name = str(dtype).replace("torch.", "")
    paths = folder / f"start-{name}.safetensors", folder / f"end-{name}.safetensors"
    for which, path in enumerate(paths):
        state = {}
        for i in range(depth):
            for part, shape in (("weight", (width, width)), ("bias", (width,))):
                g = torch.Generator().manual_seed(2 * i + (part == "bias"))
                value = torch.randn(shape, generator=g) * width**-0.5
                if which == 1:
                    g.manual_seed(10_000 + 2 * i + (part == "bias"))
                    value += 0.1 * width**-0.5 * torch.randn(shape, generator=g)
                state[f"{2 * i}.{part}"] = value.to(dtype)
        save_file(state, str(path))
        del state
    return paths


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status; this benchmark needs Linux.")


class PeakAnon:
    """The largest ``RssAnon`` seen by a thread that reads it every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, _status_kib("RssAnon"), False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))


def child(start: str, end: str, model: str, dtype: str) -> dict:
    """One measurement, in this (fresh) process: ``linear_path`` on the pair."""
    sys.path.insert(0, str(HERE))
    import ckptscope
    from ckptscope.engine import EvalConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(EXAMPLES, WIDTH, generator=g)
    y = torch.randint(0, WIDTH, (EXAMPLES,), generator=g)
    if model == "module":
        spec = build()
    elif model == "meta":
        with torch.device("meta"):
            spec = build()
    else:
        spec = "bigpairs:build"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here on
    rss0, anon0 = _status_kib("VmRSS"), _status_kib("RssAnon")
    t0 = time.perf_counter()
    with PeakAnon() as peak:
        ds = ckptscope.linear_path(start, end, spec, (x, y), groups={"first": r"0\."},
                                   alphas=[0.0, 0.5, 1.0], dtype=dtype,
                                   config=EvalConfig(batch_size=EXAMPLES))
    seconds = time.perf_counter() - t0
    return {
        "peak_anon_mib": (peak.peak - anon0) / 1024,
        "peak_rss_mib": (_status_kib("VmHWM") - rss0) / 1024,
        "seconds": seconds,
        "loss": ds.loss.values.reshape(-1).tolist(),
        "notes": ds.attrs["notes"],
    }


def run_child(code: Path, start: Path, end: Path, model: str, dtype: str) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{code}{os.pathsep}{HERE}")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(start), str(end),
               "--model", model, "--dtype", dtype]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import numpy

    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) / 2**20
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(total, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "load_average": os.getloadavg(),
    }


def report(paths: list[Path]) -> str:
    """The measurements in ``paths`` (JSON lines) as a markdown table."""
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    lines = ["| code | files | model | peak anon MiB | × one fp32 state | peak RSS MiB (mapped "
             "files included) | × state | s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['files']} | {r['model']} | failed: "
                         f"{r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r['files']} | {r['model']} | {r['peak_anon_mib']:,.0f} | "
            f"{r['peak_anon_states']:.2f} | {r['peak_rss_mib']:,.0f} | "
            f"{r['peak_rss_states']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("START", "END"))
    parser.add_argument("--model", nargs="+", default=["adapter"],
                        choices=["adapter", "module", "meta"])
    parser.add_argument("--dtype", default="float32", help="linear_path's dtype")
    parser.add_argument("--files", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--code", type=Path, default=HERE.parent,
                        help="the ckptscope checkout the children import (default: this one)")
    parser.add_argument("--label", default="", help="a name for this set of measurements")
    parser.add_argument("--out", type=Path, help="append the measurements (JSON lines) here")
    parser.add_argument("--report", type=Path, nargs="+", help="print these JSON-lines files "
                        "as a markdown table, and measure nothing")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.child:
        print(json.dumps(child(*args.child, args.model[0], args.dtype)))
        return
    state_mib = n_params() * 4 / 2**20
    info = machine()
    print(f"{n_params():,} parameters, {state_mib:.0f} MiB per float32 state; {info}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ckptscope-bigpairs-") as tmp:
        for files in args.files:
            start, end = write_pair(Path(tmp), getattr(torch, files))
            for model in args.model:
                row = run_child(args.code.resolve(), start, end, model, args.dtype)
                row.update(label=args.label, code=str(args.code.resolve()), files=files,
                           model=model, dtype=args.dtype, state_mib=state_mib, machine=info)
                if "peak_anon_mib" in row:
                    row["peak_anon_states"] = row["peak_anon_mib"] / state_mib
                    row["peak_rss_states"] = row["peak_rss_mib"] / state_mib
                print(json.dumps({k: v for k, v in row.items() if k != "machine"}))
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
            for path in (start, end):
                path.unlink()


if __name__ == "__main__":
    main()
