"""Batch augmentations on the device: random crop after padding, horizontal flip, brightness.

Every random number is drawn on the CPU from a seeded ``torch.Generator`` and then moved to the
batch's device, so one seed gives the same augmentations on any device, and the images never
leave the device. Inputs are normalised images ``(B, C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, *, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and take a random ``H x W`` crop of each image.

    Args:
        x: (B, C, H, W).
        padding: pixels added on each side; 0 returns ``x``.
        generator: a CPU generator for the offsets.

    Returns:
        (B, C, H, W), each image shifted by up to ``padding`` pixels (zeros filling in, which
        for normalised data is the mean colour).
    """
    if padding == 0:
        return x
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing puts the indexed dims first: (B, H, W, C) -> (B, C, H, W).
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(x))


def random_flip(x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_brightness(x: torch.Tensor, *, strength: float, generator: torch.Generator,
                      mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None) -> torch.Tensor:
    """Scale each image's pixel values by a factor uniform in ``[1 - strength, 1 + strength]``.

    As torchvision's ``ColorJitter(brightness=strength)`` on [0, 1] pixels followed by the
    normalisation: with the set's ``mean`` and ``std`` the factor applies to the pixel values
    and the result is clipped to [0, 1] pixels; without them, to the inputs as they are.
    """
    factor = 1 + strength * (2 * torch.rand(x.shape[0], generator=generator) - 1)
    factor = factor.to(device=x.device, dtype=x.dtype)[:, None, None, None]
    if mean is None or std is None:
        return x * factor
    m = torch.tensor(mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    s = torch.tensor(std, device=x.device, dtype=x.dtype)[None, :, None, None]
    pixels = (x * s + m) * factor
    return ((pixels.clamp(0, 1) - m) / s).contiguous(memory_format=_memory_format(x))


def augment_batch(x: torch.Tensor, kinds: Sequence[str], *, generator: torch.Generator,
                  padding: int = 4, brightness: float = 0.0,
                  normalization: tuple[Sequence[float], Sequence[float]] | None = None
                  ) -> torch.Tensor:
    """Apply ``kinds`` (``crop``, ``flip``, ``brightness``) in that order."""
    if "crop" in kinds:
        x = random_crop(x, padding=padding, generator=generator)
    if "flip" in kinds:
        x = random_flip(x, generator=generator)
    if "brightness" in kinds and brightness > 0:
        mean, std = normalization if normalization else (None, None)
        x = random_brightness(x, strength=brightness, generator=generator, mean=mean, std=std)
    return x


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not (
            x.is_contiguous()):
        return torch.channels_last
    return torch.contiguous_format
