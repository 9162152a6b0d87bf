"""Planes through three checkpoints: points against the plain reference, the coordinates, the
grid, the result file and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptscope
from ckptscope.checkpoints import save_checkpoint
from ckptscope.errors import CkptscopeError
from ckptscope.grids import open_grid, save_grid, validate_grid
from ckptscope.planes import plane
from ckptscope.points import (
    PLANE_ANCHORS,
    axis_grid,
    grid_points,
    plane_weights,
    state_at,
)
from ckptscope.results import open_result
from tests.conftest import perturbed
from tests.reference import reference_points


@pytest.fixture
def triple(mlp_pair):
    module, a, b = mlp_pair
    return module, a, b, perturbed(a, 0.4, 7)


def _flat(state, keys):
    return torch.cat([state[k].double().reshape(-1) for k in keys]).numpy()


def test_plane_points_equal_reference(triple, spiral_small):
    module, a, b, c = triple
    x, y = spiral_small["test"]
    ds = plane(a, b, c, module, spiral_small, grid=(5, 4), groups=["layers.1"], loss="bce")
    assert ds.loss.dims == ("run", "group", "split", "y", "x")
    assert ds.sizes["x"] >= 5 and ds.sizes["y"] >= 4
    for g, (group, held) in enumerate((("all", None), ("layers.1", "b"))):
        keys = list(a) if group == "all" else [k for k in a if k.startswith("layers.1")]
        coef = float(ds.c.values[0, g])
        weights = plane_weights(ds.x.values, ds.y.values, coef)
        want, acc = reference_points(module, {"a": a, "b": b, "c": c}, PLANE_ANCHORS, weights,
                                     keys, held, x, y, loss="bce")
        shape = (ds.sizes["y"], ds.sizes["x"])
        np.testing.assert_allclose(ds.loss.values[0, g, 0], want.reshape(shape), rtol=1e-5)
        np.testing.assert_allclose(ds.accuracy.values[0, g, 0], acc.reshape(shape), atol=1e-12)


def test_plane_grid_holds_the_checkpoints_exactly(triple, spiral_small):
    module, a, b, c = triple
    x, y = spiral_small["test"]
    ds = plane(a, b, c, module, spiral_small, grid=7, loss="bce")
    coef = float(ds.c.values[0, 0])
    for name, state, (ax, ay) in (("A", a, (0.0, 0.0)), ("B", b, (1.0, 0.0)),
                                  ("C", c, (coef, 1.0))):
        assert ax in ds.x.values and ay in ds.y.values, name
        assert ds.anchor_x.sel(anchor=name).values[0, 0] == ax
        # the state at that grid point is the checkpoint bit for bit
        xs, ys = ds.x.values, ds.y.values
        i = int(np.flatnonzero(ys == ay)[0]) * len(xs) + int(np.flatnonzero(xs == ax)[0])
        points = grid_points(plane_weights(xs, ys, coef), PLANE_ANCHORS, list(a), hold="b",
                             every=a)
        at = state_at(points, {"a": a, "b": b, "c": c}, i)
        assert all(torch.equal(at[k], state[k]) for k in a), name
        want, acc = reference_points(module, {"s": state}, ("s",), [[1.0]], list(a), None, x, y,
                                     loss="bce")
        got = ds.loss.sel(group="all", split="test", x=ax, y=ay).values[0]
        np.testing.assert_allclose(got, want[0], rtol=1e-6)


def test_plane_row_y0_is_the_group_path(triple, spiral_small):
    module, a, b, c = triple
    ds = plane(a, b, c, module, spiral_small, grid=5, x_range=(0, 1), groups=["layers.0"],
               loss="bce")
    path = ckptscope.linear_path(a, b, module, spiral_small, alphas=list(ds.x.values),
                                 groups=["layers.0"], loss="bce")
    np.testing.assert_allclose(ds.loss.sel(y=0.0).values, path.loss.values, rtol=1e-6)


def test_plane_geometry_against_numpy(triple, spiral_small):
    module, a, b, c = triple
    ds = plane(a, b, c, module, spiral_small, grid=3, loss="bce")
    params = [k for k, _ in module.named_parameters()]
    va, vb, vc = (_flat(s, params) for s in (a, b, c))
    ab, ac = vb - va, vc - va
    coef = ac @ ab / (ab @ ab)
    np.testing.assert_allclose(ds.c.values[0, 0], coef, rtol=1e-10)
    np.testing.assert_allclose(ds.ab_norm.values[0, 0], np.linalg.norm(ab), rtol=1e-10)
    np.testing.assert_allclose(ds.v_norm.values[0, 0], np.linalg.norm(ac - coef * ab),
                               rtol=1e-8)


def test_plane_default_range_widens_for_c_outside(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    # C beyond B along B - A, plus a sideways step: c is about 2.
    c = {k: (a[k] + 2 * (b[k] - a[k]) + 0.3 * torch.randn_like(a[k])
             if a[k].is_floating_point() else a[k]) for k in a}
    ds = plane(a, b, c, module, spiral_small, grid=5, loss="bce")
    coef = float(ds.c.values[0, 0])
    assert coef > 1.5
    assert ds.x.values[0] == -0.25 and ds.x.values[-1] == pytest.approx(coef + 0.25)
    assert coef in ds.x.values and 0.0 in ds.x.values and 1.0 in ds.x.values


def test_axis_grid_keeps_anchors_and_count():
    grid = axis_grid(-0.25, 1.25, 21, keep=[0.0, 1.0, 0.3])
    assert len(grid) == 21 and grid[0] == -0.25 and grid[-1] == 1.25
    assert {0.0, 1.0, 0.3} <= set(grid.tolist())
    assert np.all(np.diff(grid) > 0)
    # a kept value nearest an end is inserted, not moved onto the end
    assert axis_grid(0, 1, 2, keep=[0.9]).tolist() == [0.0, 0.9, 1.0]
    assert axis_grid(0, 1, 5, keep=[5.0]).tolist() == np.linspace(0, 1, 5).tolist()


def test_plane_result_round_trip(tmp_path, triple, spiral_small):
    module, a, b, c = triple
    ds = plane(a, b, c, module, spiral_small, grid=3, loss="bce")
    path = save_grid(ds, tmp_path / "plane.nc")
    back = open_grid(path)
    assert back.attrs["grid_kind"] == "plane"
    np.testing.assert_array_equal(back.loss.values, ds.loss.values)
    np.testing.assert_array_equal(back.x.values, ds.x.values)
    with pytest.raises(CkptscopeError, match="grid result.*open_grid"):
        open_result(path)


def test_open_grid_refuses_a_path_result(tmp_path, mlp_pair, spiral_small):
    module, a, b = mlp_pair
    ckptscope.save_result(ckptscope.linear_path(a, b, module, spiral_small, alphas=3,
                                                loss="bce"), tmp_path / "p.nc")
    with pytest.raises(CkptscopeError, match="is a path result"):
        open_grid(tmp_path / "p.nc")


def test_validate_grid_names_the_problem(triple, spiral_small):
    module, a, b, c = triple
    ds = plane(a, b, c, module, spiral_small, grid=3, loss="bce")
    with pytest.raises(CkptscopeError, match="'x' is not a finite, strictly increasing"):
        validate_grid(ds.assign_coords(x=ds.x.values[::-1]))
    with pytest.raises(CkptscopeError, match="variable 'c' is missing"):
        validate_grid(ds.drop_vars("c"))
    with pytest.raises(CkptscopeError, match="grid_kind"):
        validate_grid(ds.assign_attrs(grid_kind="cube"))
    with pytest.raises(CkptscopeError, match="'accuracy' holds values outside"):
        validate_grid(ds.assign(accuracy=ds.accuracy + 2))


def test_plane_identical_a_and_b(triple, spiral_small):
    module, a, _, c = triple
    with pytest.raises(CkptscopeError, match="A and B are identical over group 'all'"):
        plane(a, dict(a), c, module, spiral_small, grid=3, loss="bce")


def test_plane_identical_over_one_group(triple, spiral_small):
    module, a, b, c = triple
    b = {k: a[k] if k.startswith("layers.0") else v for k, v in b.items()}
    with pytest.raises(CkptscopeError, match="identical over group 'layers.0'"):
        plane(a, b, c, module, spiral_small, grid=3, groups=["layers.0"], loss="bce")


def test_plane_collinear_c(triple, spiral_small):
    module, a, b, _ = triple
    mid = {k: (a[k] + 0.5 * (b[k] - a[k]) if a[k].is_floating_point() else a[k]) for k in a}
    with pytest.raises(CkptscopeError, match="C lies on the line through A and B"):
        plane(a, b, mid, module, spiral_small, grid=3, loss="bce")


def test_plane_mismatched_shapes(tmp_path, triple, spiral_small):
    module, a, b, c = triple
    c = dict(c)
    c["layers.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CkptscopeError, match="shapes differ: layers.0.weight"):
        plane(a, b, c, module, spiral_small, grid=3, loss="bce")


@pytest.mark.parametrize("kwargs, match", [
    ({"x_range": (1.0, 0.0)}, r"x range \[1.0, 0.0\] is not finite and increasing"),
    ({"y_range": (0.0, 1.0, 1)}, "y grid needs an int count of at least 2"),
    ({"x_range": ("a", 1)}, "x_range=.*is not"),
    ({"grid": 1}, "x grid needs an int count of at least 2"),
    ({"grid": 2.5}, "grid=2.5 is not a count"),
    ({"hold": "end"}, "hold='end' is not one of"),
    ({"dtype": "int8"}, "dtype 'int8' is not one of"),
])
def test_plane_bad_options(triple, spiral_small, kwargs, match):
    module, a, b, c = triple
    with pytest.raises(CkptscopeError, match=match):
        plane(a, b, c, module, spiral_small, loss="bce", **({"grid": 3} | kwargs))


def test_plane_from_files_records_paths(tmp_path, triple, spiral_small):
    module, a, b, c = triple
    paths = []
    for name, state in (("a", a), ("b", b), ("c", c)):
        paths.append(save_checkpoint(tmp_path / f"{name}.safetensors", state))
    ds = plane(*paths, module, spiral_small, grid=3, loss="bce")
    assert ds.anchor_path.values[0].tolist() == [str(p) for p in paths]
    assert all(len(s) == 64 for s in ds.anchor_sha256.values[0])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_plane_conv_net_with_batchnorm_equals_reference(conv_pair, image_data, strategy):
    """BatchNorm statistics move with the weights; num_batches_tracked (not float) comes from
    the nearest checkpoint on the whole-model plane and from the held one on a group's."""
    from ckptscope.engine import EvalConfig

    module, a, b = conv_pair
    c = perturbed(a, 0.3, 11)
    x, y = image_data["test"]
    ds = plane(a, b, c, module, image_data, x_range=(-0.5, 1, 3), y_range=(0, 1, 2),
               groups=["fc"], hold="c", config=EvalConfig(strategy=strategy))
    for g, (keys, held) in enumerate(((list(a), None), (["fc.weight", "fc.bias"], "c"))):
        weights = plane_weights(ds.x.values, ds.y.values, float(ds.c.values[0, g]))
        want, _ = reference_points(module, {"a": a, "b": b, "c": c}, PLANE_ANCHORS, weights,
                                   keys, held, x, y)
        np.testing.assert_allclose(ds.loss.values[0, g, 0].reshape(-1), want, rtol=1e-5)


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(-5, 5), width=st.floats(0.01, 10), n=st.integers(2, 40),
       keep=st.lists(st.floats(-10, 10), max_size=4))
def test_axis_grid_invariants(lo, width, n, keep):
    hi = lo + width
    grid = axis_grid(lo, hi, n, keep=keep)
    assert grid[0] == lo and grid[-1] == hi
    assert np.all(np.diff(grid) > 0)
    inside = {k for k in keep if lo <= k <= hi}
    assert inside <= set(grid.tolist())
    assert n <= len(grid) <= n + len(inside)
