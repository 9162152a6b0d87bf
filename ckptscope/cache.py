"""Completed group paths kept on disk beside the output, so an interrupted run resumes.

Each (run, group) path that finishes is written to ``DIR/<key>.npz`` (atomically: a temporary
name, then a rename). The key is a sha256 over everything the curves depend on — the
checkpoints' bytes, the model and its options, the data, the alpha grid, the group's keys, the
hold, dtype, BatchNorm policy and loss — so a cached curve is reused only for the very same
question. Files are read with ``allow_pickle=False``; an unreadable or mismatched one is ignored
and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ckptscope.files import replacing


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over keys, dtypes, shapes and bytes of a state dict (for in-memory inputs)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def path_key(fields: Mapping[str, object]) -> str:
    """Return the cache key of one path: a sha256 of its JSON-encoded fields."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class PathCache:
    """A folder of finished group paths.

    Args:
        folder: where the ``.npz`` files live (created on the first write).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.hits = 0  # paths served from files an earlier call left
        self._earlier = set(self.folder.glob("*.npz")) if self.folder.is_dir() else set()

    def load(self, key: str, n_split: int, n_alpha: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Return (loss, accuracy), each (split, alpha), or ``None`` if absent or unusable."""
        path = self.folder / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                loss, acc = np.asarray(f["loss"]), np.asarray(f["accuracy"])
        except Exception:  # a damaged file is recomputed, never trusted
            return None
        if loss.shape != (n_split, n_alpha) or acc.shape != (n_split, n_alpha):
            return None
        self.hits += path in self._earlier
        return loss, acc

    def store(self, key: str, loss: np.ndarray, accuracy: np.ndarray) -> None:
        """Write one path's curves atomically."""
        with replacing(self.folder / f"{key}.npz", suffix=".npz") as tmp:
            np.savez(tmp, loss=np.asarray(loss, dtype=np.float64),
                     accuracy=np.asarray(accuracy, dtype=np.float64))

    def clear(self) -> None:
        """Remove the folder (after the final result is safely written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
