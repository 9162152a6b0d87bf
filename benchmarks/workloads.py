"""The benchmark workloads: a model, two endpoint states, evaluation data and the groups.

- ``spiral_mlp``: the paper's spiral MLP (2x50 hidden, BCE) on the 5,000 test points of eq. 3;
  the end state is the start plus 0.3 N(0, 1) noise on every tensor (seeded). Other widths and
  sizes too: ``spiral_mlp(widths=(2, 64, 64, 64, 1), points=6000)`` is the small model of the
  default-threads rows.
- ``resnet18_cifar``: ckptscope's CIFAR ResNet-18 on random CIFAR-shaped images (N(0, 1),
  10 classes); start and end are two independent initialisations (seeds 0 and 1), as in a
  two-seed comparison. Fresh BatchNorm running statistics are equal in both (mean 0, var 1), so
  every method — including loss-landscapes, which moves parameters only — walks the same path.

Every workload is built on the CPU from fixed seeds and moved to a device by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ckptscope.adapters import get_adapter
from ckptscope.data import load_data
from ckptscope.groups import Group, normalise_groups, resolve_groups
from ckptscope.points import PointSet, path_points


@dataclass(frozen=True)
class Workload:
    """One benchmark case.

    Attributes:
        name: the label in the tables.
        module: the architecture (its own weights are ignored by every method).
        start, end: the endpoint state dicts (theta_a, theta_b).
        x, y: the evaluation inputs ``(N, ...)`` and targets ``(N,)``.
        loss: ``bce`` or ``cross_entropy`` (ckptscope's names).
        groups: name -> regex for a group sweep; empty for the whole-model path only.
    """

    name: str
    module: nn.Module
    start: dict[str, torch.Tensor]
    end: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    loss: str
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return len(self.x)

    def resolved_groups(self) -> list[Group]:
        """The paths this workload evaluates: ``all`` alone, or each group (no ``all``)."""
        return resolve_groups(
            list(self.start), normalise_groups(self.groups or None), full=not self.groups
        )

    def anchors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The two states as the evaluator's anchors."""
        return {"start": self.start, "end": self.end}

    def points(self, keys: list[str], alphas: np.ndarray) -> PointSet:
        """The path of ``keys`` at ``alphas`` (the rest held at the end), as the evaluator
        takes it."""
        return path_points(alphas, keys, hold="end", every=list(self.start))


def spiral_mlp(*, preset: str | None = None, seed: int = 0,
               widths: tuple[int, ...] = (2, 50, 50, 1), points: int = 5000) -> Workload:
    """The spiral MLP ``widths`` (the paper's [2, 50, 50, 1] by default) on the spiral test split
    of ``points`` points (5,000, the paper's, by default)."""
    adapter = get_adapter("mlp")
    torch.manual_seed(seed)
    module = adapter.make({"widths": list(widths)})
    start = {k: v.clone() for k, v in module.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    end = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in start.items()}
    x, y = load_data(f"spiral:10000,{points}", seed=seed)["test"]
    groups = adapter.presets[preset](list(start)) if preset else {}
    shape = f"{len(widths) - 2}x{widths[1]}"
    name = f"spiral MLP {shape}, {points:,} points" + (f", --preset {preset}" if preset else "")
    return Workload(name, module, start, end, x, y, "bce", groups)


def resnet18_cifar(n_images: int, *, preset: str | None = None, seed: int = 0) -> Workload:
    """CIFAR ResNet-18 between two initialisations, on ``n_images`` random 3x32x32 images."""
    adapter = get_adapter("resnet18")
    torch.manual_seed(seed)
    module = adapter.make({})
    start = {k: v.clone() for k, v in module.state_dict().items()}
    torch.manual_seed(seed + 1)
    end = {k: v.clone() for k, v in adapter.make({}).state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(n_images, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (n_images,), generator=generator)
    groups = adapter.presets[preset](list(start)) if preset else {}
    name = f"ResNet-18, {n_images} CIFAR-shaped images" + (f", --preset {preset}" if preset else "")
    return Workload(name, module, start, end, x, y, "cross_entropy", groups)
