"""The two-arm spiral of the paper's appendix A, eq. 3.

Class 0: x = 2 sqrt(t) cos(8 sqrt(t) pi) + 0.02 N(0,1),
         y = 2 sqrt(t) sin(8 sqrt(t) pi) + 0.02 N(0,1),   t ~ U(0, 1);
class 1 shifts the argument of both trigonometric functions by pi.
10,000 training and 5,000 test points (classes balanced), seeded.
"""

from __future__ import annotations

import math

import torch

from ckptscope.data import DATASETS, Dataset

N_TRAIN, N_TEST = 10_000, 5_000
# A spec may come from a checkpoint's metadata: its sizes are bounded like any other value a
# file gives (a million points is 100x the paper's set, 24 MB while generated).
MAX_POINTS = 1_000_000
NOISE = 0.02


def make_spiral(n: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``n`` points of eq. 3: inputs (n, 2) float32 and 0/1 labels (n,) int64.

    The first ``n // 2`` points are class 0 and the rest class 1, then shuffled.
    """
    labels = torch.cat([torch.zeros(n // 2), torch.ones(n - n // 2)]).long()
    t = torch.rand(n, generator=generator, dtype=torch.float64)
    r = 2 * torch.sqrt(t)
    angle = 8 * torch.sqrt(t) * math.pi + math.pi * labels.double()
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64) * NOISE
    points = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1) + noise
    order = torch.randperm(n, generator=generator)
    return points[order].float(), labels[order]


def load(arg: str | None, *, seed: int = 0) -> dict:
    """Train and test splits of eq. 3; ``arg`` may give ``TRAIN,TEST`` sizes (10000,5000)."""
    n_train, n_test = N_TRAIN, N_TEST
    if arg:
        try:
            n_train, n_test = (int(v) for v in arg.split(",") if len(v) < 16)
            if not (0 < n_train <= MAX_POINTS and 0 < n_test <= MAX_POINTS):
                raise ValueError
        except ValueError:
            from ckptscope.errors import CkptscopeError

            raise CkptscopeError(
                f"spiral:{arg[:40]} is not spiral:TRAIN,TEST with sizes from 1 to {MAX_POINTS:,} "
                f"(e.g. spiral:2000,1000)."
            ) from None
    generator = torch.Generator().manual_seed(int(seed))
    return {
        "train": make_spiral(n_train, generator=generator),
        "test": make_spiral(n_test, generator=generator),
    }


DATASETS.register("spiral")(
    Dataset("spiral", load, "the paper's spiral (eq. 3), 10000 train / 5000 test")
)
