"""Array transforms shared by the file-based datasets: pixel normalisation and seeded subsets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ckptscope.errors import CkptscopeError


def normalize_pixels(
    pixels: np.ndarray, *, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Return ``(pixels / 255 - mean) / std`` per channel as a float32 tensor.

    Args:
        pixels: (n, channel, height, width) uint8; may be a strided view of a file buffer.
        mean: one value per channel, on the [0, 1] scale.
        std: one value per channel, on the [0, 1] scale.

    Returns:
        (n, channel, height, width) float32. The only copy is the conversion to float32; the
        rest happens in place.
    """
    if pixels.ndim != 4 or pixels.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"pixels of shape {pixels.shape} do not match {len(mean)} means and {len(std)} stds."
        )
    x = pixels.astype(np.float32)  # a fresh contiguous array, so the in-place steps are safe
    x /= np.float32(255)
    x -= np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return torch.from_numpy(x)


def subset(splits: Mapping[str, tuple], n: int, *, seed: int) -> dict[str, tuple]:
    """Keep at most ``n`` examples of every split: the first ``n`` of a seeded permutation.

    Each split draws its own permutation from ``seed`` alone, so a split's subset does not depend
    on which other splits are present. A split with ``n`` or fewer examples is kept whole (in
    permuted order). Not stratified.

    Args:
        splits: split -> (inputs, targets), tensors or numpy arrays with a leading example dim.
        n: the number of examples to keep per split, at least 1.
        seed: seeds the permutation.

    Example:
        >>> small = subset(load_data(f"cifar10:{root}"), 1000, seed=0)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise CkptscopeError(f"subset size {n!r} is not a positive integer; give e.g. 1000.")
    out = {}
    for split, (x, y) in splits.items():
        if len(x) != len(y):
            raise CkptscopeError(
                f"split {split!r} has {len(x)} inputs and {len(y)} targets; they must be equal."
            )
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))
        keep = order[: int(n)]
        out[split] = tuple(v[keep] if isinstance(v, torch.Tensor) else v[keep.numpy()]
                           for v in (x, y))
    return out
