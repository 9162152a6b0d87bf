"""Timing, the machine's matmul rate, forward FLOPs, and the machine and versions.

Timings are taken round-robin: every repeat runs each method once, in an order rotated by one
per repeat, so that a burst of load from another process lands on all methods alike. Wall time
and the process's CPU time (``time.process_time``, all threads) are both kept; on a shared
machine the CPU time is the steadier of the two.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Timing:
    """Wall and CPU seconds of each repeat of one method."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)

    @property
    def spread(self) -> str:
        """``min-max`` of the wall times, for the table."""
        return f"{min(self.wall):.3g}-{max(self.wall):.3g}"


def pin_malloc() -> str:
    """Keep freed memory in the heap (:func:`ckptscope.allocator.keep_freed_memory`, what the
    ``ckptscope`` program does) for every method in this process alike; a line for the machine
    section.

    With glibc's defaults, whether a forward pass's activations come from warm heap pages or
    from fresh pages that must be faulted in depends on what the process freed before, so one
    method's timing moves with the previous method's garbage (seen here: the same MLP path
    37 ms or 57 ms).
    """
    from ckptscope.allocator import (
        MMAP_THRESHOLD,
        TRIM_THRESHOLD,
        keep_freed_memory,
        user_settings,
    )

    if user_settings():
        return "as the environment sets it: " + ", ".join(user_settings())
    if not keep_freed_memory():
        return "the platform's default (mallopt not available)"
    return (f"glibc, pinned for every method alike: mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
            f"trim threshold {TRIM_THRESHOLD >> 20} MiB")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    calls: Mapping[str, Callable[[], object]],
    *,
    repeat: int,
    device: torch.device,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, Timing], dict[str, object]]:
    """Run every call ``repeat`` times, interleaved; return the timings and the last results."""
    names = list(calls)
    timings = {name: Timing() for name in names}
    results: dict[str, object] = {}
    for r in range(repeat):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = calls[name]()
            synchronize(device)
            timings[name].wall.append(time.perf_counter() - wall)
            timings[name].cpu.append(time.process_time() - cpu)
            log(f"  repeat {r + 1}/{repeat}  {name}: {timings[name].wall[-1]:.3f} s")
    return timings, results


def _clock(clock: str) -> Callable[[], float]:
    return {"wall": time.perf_counter, "cpu": time.process_time}[clock]


def matmul_rate(
    device: torch.device, dtype: torch.dtype = torch.float32, *, n: int = 2048, repeat: int = 5,
    inner: int = 1, clock: str = "wall",
) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul: the median of ``repeat`` timings.

    Each timing covers ``inner`` matmuls (raise it on a GPU, where one is too short to time).
    ``clock="cpu"`` divides by the process's CPU time instead of the wall time (steadier on a
    shared CPU; with several threads it is a rate per busy core).
    """
    now = _clock(clock)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(repeat):
        synchronize(device)
        t0 = now()
        for _ in range(inner):
            a @ b
        synchronize(device)
        rates.append(2 * n**3 * inner / (now() - t0))
    return statistics.median(rates)


def fma_peak() -> tuple[float | None, str]:
    """One core's fp32 peak in FLOP/s, and what was measured: ``fma_peak.c`` built with the
    system's C compiler (``-O2 -march=native``; the next compiler is tried when one fails) and
    run. ``(None, why)`` where no compiler builds it. No Python-level loop gets near the peak,
    and no torch kernel is a fair stand-in for it."""
    compilers = [c for c in dict.fromkeys(shutil.which(n) for n in ("cc", "gcc", "clang")) if c]
    if not compilers:
        return None, "no C compiler"
    source = Path(__file__).with_name("fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "fma_peak"
        for compiler in compilers:
            try:
                subprocess.run([compiler, "-O2", "-march=native", "-ffp-contract=fast", "-o",
                                str(exe), str(source)], check=True, capture_output=True,
                               timeout=60)
                lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                                       timeout=60).stdout.split("\n")
                fields = dict(line.split() for line in lines if line.strip())
                rate = max(float(v) for k, v in fields.items() if k != "fma") * 1e9
            except (OSError, subprocess.SubprocessError, ValueError):
                continue
            what = "FMA" if fields.get("fma") == "1" else "multiply-add (no FMA in this build)"
            return rate, f"{what}, {Path(compiler).name} -O2 -march=native"
    return None, f"{', '.join(Path(c).name for c in compilers)} could not build or run it"


def conv_rate(device: torch.device, *, repeat: int = 5, clock: str = "wall") -> float:
    """FLOP/s of a 3x3 convolution, 256 -> 256 channels on 16x16 maps, batch 32 (float32).

    ResNet-18's middle layers look like this; on some CPUs oneDNN's convolutions run faster
    than the BLAS matmul, and then a ResNet can pass "100% of the matmul floor".
    """
    now = _clock(clock)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(32, 256, 16, 16, device=device, generator=generator)
    w = torch.randn(256, 256, 3, 3, device=device, generator=generator)
    flops = 2 * 32 * 256 * 16 * 16 * 256 * 9
    with torch.no_grad():
        for _ in range(2):
            torch.nn.functional.conv2d(x, w, padding=1)
        rates = []
        for _ in range(repeat):
            synchronize(device)
            t0 = now()
            torch.nn.functional.conv2d(x, w, padding=1)
            synchronize(device)
            rates.append(flops / (now() - t0))
    return statistics.median(rates)


def forward_flops(module: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on one example (``example``: ``(1, ...)``).

    ``FlopCounterMode`` counts matmuls and convolutions (2 per multiply-add); elementwise ops,
    BatchNorm and pooling are left out, so the floor below is a lower bound on the real work.
    """
    model = module.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    return int(counter.get_total_flops())


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_vector_units() -> str:
    """torch's CPU kernel level, and whether the CPU has bf16 dot products (AVX512-BF16, AMX)."""
    flags = set((_cpuinfo("flags") or "").split())
    bf16 = [name for name in ("avx512_bf16", "amx_bf16") if name in flags]
    return (f"torch kernels {torch.backends.cpu.get_cpu_capability()}; bf16 dot products: "
            f"{', '.join(bf16) if bf16 else 'none found'}")


def describe(device: torch.device) -> dict[str, str]:
    """Machine, versions and date, for the header of a results file."""
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores, {platform.machine()}",
        "cpu vector units": _cpu_vector_units(),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ckptscope": _package_version("ckptscope"),
        "loss-landscapes": _package_version("loss-landscapes"),
    }
    if hasattr(os, "getloadavg"):
        info["load average (1, 5, 15 min) at start"] = ", ".join(
            f"{v:.1f}" for v in os.getloadavg()
        )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        info["cuda / cudnn"] = f"{torch.version.cuda} / {torch.backends.cudnn.version()}"
        info["tf32 (matmul / cudnn)"] = (
            f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}"
        )
    return info
