"""Surfaces around one checkpoint: directions (filter normalisation, seeds, files), points
against the plain reference, checkpoints as directions, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptscope.checkpoints import save_checkpoint
from ckptscope.directions import (
    checkpoint_directions,
    load_directions,
    random_directions,
    save_directions,
)
from ckptscope.errors import CkptscopeError
from ckptscope.points import SURFACE_ANCHORS, grid_points, state_at, surface_weights
from ckptscope.surfaces import surface
from tests.conftest import SmallConvNet, perturbed
from tests.reference import reference_points


@pytest.fixture
def conv_center():
    torch.manual_seed(3)
    module = SmallConvNet()
    return module, perturbed(module.state_dict(), 0.1, 4)


def test_filter_norms_match_the_centre(conv_center):
    module, center = conv_center
    dirs = random_directions(center, seed=1, norm="filter", module=module)
    for d in (dirs.x, dirs.y):
        for k, w in center.items():
            if not w.is_floating_point():
                assert k not in d
            elif w.dim() <= 1 or k.startswith("bn."):
                assert not d[k].any(), k  # biases, BatchNorm weights and statistics: zero
            else:
                rows_d = d[k].double().reshape(len(w), -1).norm(dim=1)
                rows_w = w.double().reshape(len(w), -1).norm(dim=1)
                np.testing.assert_allclose(rows_d.numpy(), rows_w.numpy(), rtol=1e-6)


def test_layer_norm_and_include_1d(conv_center):
    module, center = conv_center
    dirs = random_directions(center, seed=1, norm="layer", include_1d=True, module=module)
    for k in ("conv.weight", "fc.weight", "conv.bias", "bn.weight"):
        np.testing.assert_allclose(float(dirs.x[k].double().norm()),
                                   float(center[k].double().norm()), rtol=1e-6)
    assert not dirs.x["bn.running_var"].any()  # buffers never move
    filt = random_directions(center, seed=1, norm="filter", include_1d=True, module=module)
    np.testing.assert_allclose(filt.y["fc.bias"].abs().numpy(), center["fc.bias"].abs().numpy(),
                               rtol=1e-6)


def test_random_directions_reproducible_from_seed(conv_center):
    module, center = conv_center
    one = random_directions(center, seed=5, module=module)
    two = random_directions(center, seed=5, module=module)
    other = random_directions(center, seed=6, module=module)
    assert all(torch.equal(one.x[k], two.x[k]) and torch.equal(one.y[k], two.y[k])
               for k in one.x)
    assert not torch.equal(one.x["conv.weight"], other.x["conv.weight"])
    assert not torch.equal(one.x["conv.weight"], one.y["conv.weight"])


def test_directions_save_load_round_trip(tmp_path, conv_center):
    module, center = conv_center
    dirs = random_directions(center, seed=2, module=module)
    path = save_directions(tmp_path / "dirs.safetensors", dirs)
    back = load_directions(path, center, module=module)
    assert all(torch.equal(dirs.x[k], back.x[k]) and torch.equal(dirs.y[k], back.y[k])
               for k in dirs.x)
    assert (back.kind, back.norm, back.seed) == ("file", "filter", 2)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "x.conv.weight" in f.keys() and "y.fc.weight" in f.keys()  # noqa: SIM118


def test_load_directions_refuses_other_names_and_shapes(tmp_path, conv_center):
    module, center = conv_center
    save_checkpoint(tmp_path / "bad.safetensors", {"x.nope": torch.ones(2)})
    with pytest.raises(CkptscopeError, match="holds x.nope, which are not x.KEY"):
        load_directions(tmp_path / "bad.safetensors", center)
    save_checkpoint(tmp_path / "shape.safetensors", {"x.fc.weight": torch.ones(2, 2),
                                                     "y.fc.weight": torch.ones(2, 2)})
    with pytest.raises(CkptscopeError, match=r"x.fc.weight is torch.float32 \(2, 2\)"):
        load_directions(tmp_path / "shape.safetensors", center)
    save_checkpoint(tmp_path / "zero.safetensors", {"x.fc.weight": center["fc.weight"],
                                                    "y.fc.weight": 0 * center["fc.weight"]})
    with pytest.raises(CkptscopeError, match="the y direction is zero everywhere"):
        load_directions(tmp_path / "zero.safetensors", center)


def _reference_surface(module, center, dirs, ds, keys, x, y):
    weights = surface_weights(ds.x.values, ds.y.values)
    anchors = {"center": center, "d1": {**center, **dirs.x}, "d2": {**center, **dirs.y}}
    return reference_points(module, anchors, SURFACE_ANCHORS, weights, keys, "center", x, y,
                            loss="bce")


def test_surface_points_equal_reference(mlp_pair, spiral_small):
    module, center, _ = mlp_pair
    x, y = spiral_small["test"]
    ds = surface(center, module, spiral_small, seed=3, grid=5, span=0.5, groups=["layers.1"],
                 loss="bce")
    assert ds.attrs["grid_kind"] == "surface" and ds.attrs["direction_seed"] == 3
    dirs = random_directions(center, seed=3, module=module)
    shape = (ds.sizes["y"], ds.sizes["x"])
    for g, keys in enumerate((list(center), [k for k in center if k.startswith("layers.1")])):
        want, acc = _reference_surface(module, center, dirs, ds, keys, x, y)
        np.testing.assert_allclose(ds.loss.values[0, g, 0], want.reshape(shape), rtol=1e-5)
        np.testing.assert_allclose(ds.accuracy.values[0, g, 0], acc.reshape(shape), atol=1e-12)
    # the centre is exact
    want, _ = reference_points(module, {"o": center}, ("o",), [[1.0]], [], "o", x, y,
                               loss="bce")
    np.testing.assert_allclose(ds.loss.sel(group="all", x=0.0, y=0.0).values[0, 0], want[0],
                               rtol=1e-6)
    xx = surface_weights(ds.x.values, ds.y.values)
    i = int(np.flatnonzero((xx[:, 1] == 0) & (xx[:, 2] == 0))[0])
    at = state_at(grid_points(xx, SURFACE_ANCHORS, dirs.moving(list(center)), hold="center",
                              every=center, nearest=False),
                  {"center": center, "d1": dirs.x, "d2": dirs.y}, i)
    assert all(torch.equal(at[k], center[k]) for k in center)
    np.testing.assert_allclose(ds.x_norm.values[0, 0], np.sqrt(sum(
        float(v.double().square().sum()) for v in dirs.x.values())), rtol=1e-10)


def test_surface_saved_directions_give_the_same_surface(tmp_path, mlp_pair, spiral_small):
    module, center, _ = mlp_pair
    one = surface(center, module, spiral_small, seed=1, grid=3, loss="bce",
                  save_directions=tmp_path / "d.safetensors")
    two = surface(center, module, spiral_small, directions=tmp_path / "d.safetensors", grid=3,
                  loss="bce")
    np.testing.assert_array_equal(one.loss.values, two.loss.values)
    assert two.attrs["directions"] == "file" and two.attrs["direction_norm"] == "filter"


def test_surface_checkpoints_as_directions_hit_them_exactly(mlp_pair, spiral_small):
    module, center, a = mlp_pair
    b = perturbed(center, 0.3, 9)
    x, y = spiral_small["test"]
    ds = surface(center, module, spiral_small, directions=(a, b), grid=4, loss="bce")
    assert ds.anchor.values.tolist() == ["center", "A", "B"]
    for state, (ax, ay) in ((center, (0, 0)), (a, (1, 0)), (b, (0, 1))):
        want, _ = reference_points(module, {"s": state}, ("s",), [[1.0]], [], "s", x, y,
                                   loss="bce")
        got = ds.loss.sel(group="all", split="test", x=float(ax), y=float(ay)).values[0]
        np.testing.assert_allclose(got, want[0], rtol=1e-6)
    weights = surface_weights(ds.x.values, ds.y.values, affine=True)
    want, _ = reference_points(module, {"o": center, "a": a, "b": b}, ("o", "a", "b"), weights,
                               list(center), None, x, y, loss="bce")
    np.testing.assert_allclose(ds.loss.values[0, 0, 0].reshape(-1), want, rtol=1e-5)


def test_checkpoint_directions_refuse_the_centre(mlp_pair):
    _, center, a = mlp_pair
    with pytest.raises(CkptscopeError, match="B equals CENTER in every floating tensor"):
        checkpoint_directions(center, a, dict(center))


@pytest.mark.parametrize("kwargs, match", [
    ({"norm": "unit"}, "norm 'unit' is not one of filter, layer, none"),
    ({"span": 0}, "span=0 must be a positive number"),
    ({"directions": 3}, "directions=3 is not 'random'"),
    ({"groups": ["bias=.*bias"]}, "group 'bias' has a zero direction in every tensor"),
    ({"x_range": (0.5, 0.5)}, r"x range \[0.5, 0.5\] is not finite and increasing"),
])
def test_surface_bad_options(mlp_pair, spiral_small, kwargs, match):
    module, center, _ = mlp_pair
    with pytest.raises(CkptscopeError, match=match):
        surface(center, module, spiral_small, loss="bce", **({"grid": 3} | kwargs))


def test_surface_mismatched_direction_checkpoint(mlp_pair, spiral_small):
    module, center, a = mlp_pair
    b = dict(a)
    b["layers.0.weight"] = torch.zeros(2, 2)
    with pytest.raises(CkptscopeError, match="shapes differ: layers.0.weight"):
        surface(center, module, spiral_small, directions=(a, b), grid=3, loss="bce")


def test_surface_conv_net_holds_buffers_at_the_centre(conv_center, image_data):
    module, center = conv_center
    x, y = image_data["test"]
    ds = surface(center, module, image_data, seed=2, grid=3, span=0.3)
    dirs = random_directions(center, seed=2, module=module)
    weights = surface_weights(ds.x.values, ds.y.values)
    anchors = {"center": center, "d1": {**center, **dirs.x}, "d2": {**center, **dirs.y}}
    want, _ = reference_points(module, anchors, SURFACE_ANCHORS, weights, list(center),
                               "center", x, y)
    np.testing.assert_allclose(ds.loss.values[0, 0, 0].reshape(-1), want, rtol=1e-5)
