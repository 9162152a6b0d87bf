"""The alpha grid, point sets and the state at a point (eq. 1 and 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptscope.errors import CkptscopeError
from ckptscope.points import alpha_grid, parse_alpha_range, path_points, path_state


def test_alpha_grid_count_includes_both_ends():
    grid = alpha_grid(51)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 51
    np.testing.assert_allclose(np.diff(grid), 0.02)


def test_alpha_grid_sequence_and_extrapolation():
    np.testing.assert_array_equal(alpha_grid([-0.5, 0, 1.5]), [-0.5, 0, 1.5])
    np.testing.assert_allclose(parse_alpha_range("-0.5:1.5:5"), [-0.5, 0, 0.5, 1, 1.5])


@pytest.mark.parametrize(
    "bad, match",
    [
        (1, "too few"),
        ([], "empty"),
        ([0, 0.5, 0.5], "increasing"),
        ([0, float("nan")], "NaN"),
        ([0.5], "one point"),
        (51.0, "neither a count nor a list"),
        (np.float64(51), "neither a count nor a list"),
        (True, "bool"),
        ("51", "neither a count nor a list"),
        ([0, "a"], "not a list of numbers"),
    ],
)
def test_alpha_grid_errors(bad, match):
    with pytest.raises(CkptscopeError, match=match):
        alpha_grid(bad)


@pytest.mark.parametrize("text", ["0:1", "a:b:3", "1:0:5", "0:1:1"])
def test_parse_alpha_range_errors(text):
    with pytest.raises(CkptscopeError, match="alpha range"):
        parse_alpha_range(text)


def test_path_state_group_moves_rest_held():
    a = {"w": torch.zeros(2), "v": torch.zeros(2), "n": torch.tensor(1)}
    b = {"w": torch.ones(2), "v": torch.full((2,), 2.0), "n": torch.tensor(9)}
    points = path_points([0.25], ["w", "n"], hold="end", every=list(a))
    assert points.moving == ("w", "n") and points.held == "end"
    s = path_state(a, b, 0.25, keys=["w", "n"], hold="end")
    assert torch.equal(s["w"], torch.full((2,), 0.25))
    assert torch.equal(s["v"], b["v"]) and int(s["n"]) == 9
    s = path_state(a, b, 0.25, keys=["w"], hold="start")
    assert torch.equal(s["v"], a["v"]) and int(s["n"]) == 1


def test_path_points_rejects_bad_hold():
    with pytest.raises(CkptscopeError, match="hold"):
        path_points([0.0, 1.0], [], hold="middle")


@pytest.mark.parametrize("alphas, match", [([0.5], "one point"), (51.0, "neither a count")])
def test_linear_path_refuses_a_bad_grid_before_any_work(tmp_path, alphas, match):
    from ckptscope import linear_path

    # The checkpoints do not exist: the grid's error comes first, before anything is read.
    with pytest.raises(CkptscopeError, match=match):
        linear_path(tmp_path / "a.safetensors", tmp_path / "b.safetensors", alphas=alphas)
