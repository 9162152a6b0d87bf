"""The alpha grid, point sets and the state at a point (eq. 1 and 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptscope.errors import CkptscopeError
from ckptscope.points import (
    PointSet,
    alpha_grid,
    parse_alpha_range,
    parse_axis_range,
    path_points,
    path_state,
    stack_points,
    stacking,
    state_at,
    write_point,
)


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


def test_point_set_checks_its_shape_anchors_and_held():
    with pytest.raises(CkptscopeError, match="do not match 3 anchors"):
        PointSet(("a", "b", "c"), np.ones((4, 2)), ("w",))
    with pytest.raises(CkptscopeError, match="distinct"):
        PointSet(("a", "a"), np.ones((1, 2)), ("w",))
    with pytest.raises(CkptscopeError, match="held anchor 'z'"):
        PointSet(("a", "b"), np.ones((1, 2)), ("w",), held="z")
    with pytest.raises(CkptscopeError, match="NaN or Inf"):
        PointSet(("a", "b"), [[np.nan, 1.0]], ("w",))
    assert len(PointSet(("a", "b"), np.empty(0), ("w",))) == 0


def test_rest_is_the_held_anchor_or_the_nearest_with_ties_to_the_later():
    w = [[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.4, 0.4], [-1, 0.5, 1.5], [0.6, 0.3, 0.1]]
    assert PointSet(("a", "b", "c"), w, ("w",)).rest().tolist() == [0, 1, 2, 2, 0]
    assert PointSet(("a", "b", "c"), w, ("w",), held="b").rest().tolist() == [1] * 5
    path = path_points([-0.5, 0, 0.49, 0.5, 1, 1.5], ["w"], every=["w"])
    assert path.held is None and path.rest().tolist() == [0, 0, 0, 1, 1, 1]
    assert path.exact().tolist() == [-1, 0, -1, -1, 1, -1]


def _anchors(k: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=g), "v": torch.randn(5, generator=g),
             "n": torch.tensor(i)} for i in range(k)]


WEIGHTS = np.array([[1, 0, 0], [0, 0, 1], [0.2, 0.3, 0.5], [-0.5, 1.0, 0.5], [0, 0.5, 0.5],
                    [1 / 3, 1 / 3, 1 / 3], [0, 0, 0]])


def test_three_anchor_state_is_the_weighted_sum_and_the_fast_forms_agree():
    states = _anchors(3)
    names = ("a", "b", "c")
    points = PointSet(names, WEIGHTS, ("w", "v", "n"))
    at = stacking(WEIGHTS, dtype=torch.float32, device=torch.device("cpu"))
    stacked = {k: stack_points([s[k] for s in states], at) for k in ("w", "v")}
    for i, w in enumerate(WEIGHTS):
        state = state_at(points, dict(zip(names, states, strict=True)), i)
        targets = [torch.empty(3, 4), torch.empty(5)]
        write_point(targets, [[s["w"], s["v"]] for s in states], w)
        for j, key in enumerate(("w", "v")):
            want = sum(float(wi) * s[key].double() for wi, s in zip(w, states, strict=True))
            torch.testing.assert_close(state[key].double(), want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(targets[j], state[key], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(stacked[key][i], state[key], rtol=1e-6, atol=1e-6)
            if (unit := points.exact()[i]) >= 0:  # an anchor itself, bit for bit
                assert torch.equal(state[key], states[unit][key])
                assert torch.equal(targets[j], states[unit][key])
                assert torch.equal(stacked[key][i], states[unit][key])
        assert int(state["n"]) == points.rest()[i]  # non-float: from the nearest anchor


def test_an_anchor_with_weight_zero_does_not_reach_the_point():
    states = _anchors(3)
    states[0]["w"] = torch.full((3, 4), float("nan"))
    w = np.array([[0.0, 0.4, 0.6], [0.0, 1.0, 0.0]])
    at = stacking(w, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.isfinite(stack_points([s["w"] for s in states], at)).all()
    for row in w:
        targets = [torch.empty(3, 4)]
        write_point(targets, [[s["w"]] for s in states], row)
        assert torch.isfinite(targets[0]).all()


def test_path_state_of_the_whole_model_takes_non_float_tensors_from_the_nearer_end():
    a = {"w": torch.zeros(2), "v": torch.zeros(1), "mask": torch.tensor([True, False])}
    b = {"w": torch.ones(2), "v": torch.ones(1), "mask": torch.tensor([False, True])}
    for hold in ("end", "start"):
        for alpha, nearer in ((0.0, a), (0.49, a), (0.5, b), (1.0, b), (-0.5, a), (1.5, b)):
            assert torch.equal(path_state(a, b, alpha, hold=hold)["mask"], nearer["mask"])
        held = b if hold == "end" else a  # a group path: from the held end
        assert torch.equal(path_state(a, b, 0.0, keys=["w", "mask"], hold=hold)["mask"],
                           held["mask"])
        assert torch.equal(path_state(a, b, 1.0, keys=["w", "mask"], hold=hold)["mask"],
                           held["mask"])


def test_linear_path_refuses_a_grid_without_two_points_in_the_unit_interval(tmp_path):
    from ckptscope import linear_path

    with pytest.raises(CkptscopeError, match=r"point\(s\) in \[0, 1\]"):
        linear_path(tmp_path / "a.safetensors", tmp_path / "b.safetensors", alphas=[-1.0, 0.5, 2])


@pytest.mark.parametrize("parse, text, match", [
    (parse_alpha_range, "0:1", r"alpha range '0:1' is not START:STOP:N \(e.g. -0.5:1.5:81\)"),
    (parse_alpha_range, "1:0:5", r"alpha range '1:0:5' needs START < STOP and N >= 2"),
    (parse_alpha_range, "0:1:1", r"needs START < STOP and N >= 2"),
    (lambda t: parse_axis_range(t, name="y"), "a:1:3", r"y range 'a:1:3' is not LO:HI:N"),
    (lambda t: parse_axis_range(t, name="x"), "0:0:3", r"x range '0:0:3' needs LO < HI"),
])
def test_parse_range_errors_name_the_form(parse, text, match):
    with pytest.raises(CkptscopeError, match=match):
        parse(text)


def test_parse_ranges_read_lo_hi_n():
    np.testing.assert_array_equal(parse_alpha_range("-0.5:1.5:5"), [-0.5, 0.0, 0.5, 1.0, 1.5])
    assert parse_axis_range("-0.25:1.25:21") == (-0.25, 1.25, 21)
