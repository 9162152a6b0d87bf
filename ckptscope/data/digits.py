"""scikit-learn's bundled 8x8 handwritten digits: a small real set, offline (MNIST stand-in).

1,797 images of 64 pixels scaled to [0, 1], 10 classes. The split is fixed: a seeded
permutation, the last 500 images for test and the rest (1,297) for training.
"""

from __future__ import annotations

import numpy as np
import torch

from ckptscope.data import DATASETS, Dataset
from ckptscope.errors import CkptscopeError

N_TEST = 500
SPLIT_SEED = 0


def load(arg: str | None, *, seed: int = 0) -> dict:
    """Train and test splits; the split does not depend on ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CkptscopeError(
            "the digits set ships with scikit-learn, which is not installed; "
            "pip install 'ckptscope[digits]'."
        ) from None
    bunch = load_digits()
    x = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    y = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    x, y = x[order], y[order]
    return {"train": (x[:-N_TEST], y[:-N_TEST]), "test": (x[-N_TEST:], y[-N_TEST:])}


DATASETS.register("digits")(
    Dataset("digits", load, "scikit-learn's 8x8 digits (1297 train / 500 test)")
)
