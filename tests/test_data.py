"""Built-in datasets and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from ckptscope.data import as_splits, load_data, select_splits
from ckptscope.data.spiral import make_spiral
from ckptscope.errors import CkptscopeError


def test_spiral_follows_eq3():
    x, y = make_spiral(4000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert int(y.sum()) == 2000
    # Eq. 3 puts a point at radius r = 2 sqrt(t) and angle 8 sqrt(t) pi = 4 pi r (+ pi for
    # class 1). Radial noise of 0.02 moves the angle by about 4 pi 0.02 = 0.25 rad.
    xd = x.double()
    r = xd.norm(dim=1)
    assert float(r.max()) < 2.2
    residual = torch.atan2(xd[:, 1], xd[:, 0]) - 4 * math.pi * r - math.pi * y.double()
    residual = torch.remainder(residual + math.pi, 2 * math.pi) - math.pi
    far = r > 0.5  # near the centre the noise dominates the angle
    assert float(residual[far].abs().median()) < 0.3
    swapped = torch.remainder(residual + 2 * math.pi, 2 * math.pi) - math.pi
    assert float(swapped[far].abs().median()) > 2.5


def test_spiral_sizes_and_seed():
    s = load_data("spiral")
    assert len(s["train"][0]) == 10_000 and len(s["test"][0]) == 5_000
    assert torch.equal(
        load_data("spiral:10,10", seed=3)["test"][0], load_data("spiral:10,10", seed=3)["test"][0]
    )
    assert not torch.equal(
        load_data("spiral:10,10", seed=3)["test"][0], load_data("spiral:10,10", seed=4)["test"][0]
    )


def test_digits_shipped_offline():
    s = load_data("digits")
    assert s["train"][0].shape == (1297, 64) and s["test"][0].shape == (500, 64)
    assert float(s["test"][0].min()) >= 0 and float(s["test"][0].max()) <= 1
    assert sorted(set(s["test"][1].tolist())) == list(range(10))


def test_select_splits():
    s = load_data("spiral:10,10")
    assert list(select_splits(s, "both")) == ["test", "train"]
    with pytest.raises(CkptscopeError, match="not one of"):
        select_splits(s, "valid")
    with pytest.raises(CkptscopeError, match="no 'train' split"):
        select_splits({"test": s["test"]}, "train")


@pytest.mark.parametrize(
    "data, match",
    [
        ((torch.zeros(3, 2), torch.zeros(2)), "must be equal"),
        ("text", "give \\(inputs, targets\\)"),
        ({"test": torch.zeros(3)}, "not an \\(inputs, targets\\) pair"),
    ],
)
def test_as_splits_errors(data, match):
    with pytest.raises(CkptscopeError, match=match):
        as_splits(data)


def test_spiral_spec_error():
    with pytest.raises(CkptscopeError, match="spiral:TRAIN,TEST"):
        load_data("spiral:many")
