"""Beyond one process: shard the (group, alpha) grid over ``torch.distributed`` ranks.

Started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address), every rank runs the same command; each evaluates its share of the (group, alpha)
points, the curves are summed across ranks (each point owned by exactly one rank, zeros
elsewhere), and rank 0 writes the result. NCCL on GPUs, gloo on CPUs.

    torchrun --nproc-per-node 4 -m ckptscope path A B --preset blocks --out result.nc
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def requested() -> bool:
    """True when launched by torchrun (or similar) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | torch.device | None = None) -> tuple[int, int, str | torch.device | None]:
    """Join the process group if launched with several processes; return (rank, size, device).

    With ``device`` unset or ``"auto"`` on a GPU machine, rank ``LOCAL_RANK`` takes
    ``cuda:LOCAL_RANK``.
    """
    if not requested():
        return 0, 1, device
    cuda = torch.cuda.is_available() and (
        device in (None, "auto") or str(device).startswith("cuda")
    )
    if cuda and device in (None, "auto"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def owned(n_groups: int, n_alpha: int, rank: int, size: int) -> np.ndarray:
    """(group, alpha) mask of the points this rank evaluates: round-robin over the grid."""
    index = np.arange(n_groups * n_alpha).reshape(n_groups, n_alpha)
    return index % size == rank


def reduce_sum(array: np.ndarray, device: torch.device) -> np.ndarray:
    """Sum a float64 array over all ranks (NCCL needs it on the rank's GPU)."""
    if not (dist.is_available() and dist.is_initialized()):
        return array
    tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def is_main() -> bool:
    """True on rank 0, or without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
