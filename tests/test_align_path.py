"""REPAIR against its definition, and linear_path(align=, repair=) against the steps done by
hand: align, then the usual path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import ckptscope
from ckptscope.adapters.mlp import MLP
from ckptscope.align import alignment
from ckptscope.align.repair import hidden_layers, layer_stats, repair_state
from ckptscope.errors import CkptscopeError
from ckptscope.points import path_state
from tests.reference import reference_path


def _pair(widths, seed=0, **options):
    torch.manual_seed(seed)
    module = MLP(widths, **options)
    a = {k: v.clone() for k, v in module.state_dict().items()}
    torch.manual_seed(seed + 1)
    b = {k: v.clone() for k, v in MLP(widths, **options).state_dict().items()}
    return module, a, b


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = torch.randint(0, 3, (300,), generator=g)
    return {"train": (x[:200], y[:200]), "test": (x[200:], y[200:])}


def _pre_activation_stats(module, state, x, name):
    """The slow way: run the layers by hand up to ``name`` and take its output's moments."""
    model = copy.deepcopy(module)
    model.load_state_dict(state)
    out = {}
    def keep(module, args, y):
        out["y"] = y.detach().double()

    handle = model.get_submodule(name).register_forward_hook(keep)
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    y = out["y"]
    return y.mean(0), y.std(0, unbiased=False)


def test_repair_state_gives_each_hidden_layer_the_interpolated_statistics(data):
    module, a, b = _pair([6, 10, 8, 3])
    x = data["train"][0]
    layers = hidden_layers(module)
    assert layers == ["layers.0", "layers.1"]
    ends = tuple(layer_stats(module, s, x, layers) for s in (a, b))
    alpha = 0.3
    repaired = repair_state(module, path_state(a, b, alpha), alpha, ends, x, layers)
    for name in layers:
        mean, std = _pre_activation_stats(module, repaired, x, name)
        (ma, sa), (mb, sb) = ends[0][name], ends[1][name]
        torch.testing.assert_close(mean, (1 - alpha) * ma + alpha * mb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std, (1 - alpha) * sa + alpha * sb, rtol=1e-4, atol=1e-5)
    for name in layers:  # the unrepaired midpoint's variance has collapsed, which it fixes
        _, std = _pre_activation_stats(module, path_state(a, b, alpha), x, name)
        assert float(std.mean()) < float(((1 - alpha) * ends[0][name][1]
                                          + alpha * ends[1][name][1]).mean())


def test_linear_path_align_is_the_path_to_the_aligned_state(data):
    module, a, b = _pair([6, 10, 8, 3])
    ds = ckptscope.linear_path(a, b, module, data, alphas=5, align="weights",
                               groups=["layers.1"])
    aligned = alignment(a, b, module).state
    plain = ckptscope.linear_path(a, aligned, module, data, alphas=5, groups=["layers.1"])
    np.testing.assert_array_equal(ds.loss.values, plain.loss.values)
    np.testing.assert_array_equal(ds.distance.values, plain.distance.values)
    assert ds.attrs["align"] == "weights" and ds.attrs["repair"] == "none"
    assert ds.attrs["align_objective_after"] > ds.attrs["align_objective_before"]
    assert ds.attrs["align_distance_after"] < ds.attrs["align_distance_before"]
    unaligned = ckptscope.linear_path(a, b, module, data, alphas=5)
    assert unaligned.attrs["align"] == "none"
    x, y = data["test"]
    want, _ = reference_path(module, a, aligned, list(a), ds.alpha.values, x, y)
    np.testing.assert_allclose(ds.loss.sel(group="all").values[0, 0], want, rtol=1e-5)


def test_linear_path_repair_rescales_every_inner_point_and_keeps_the_ends(data, tmp_path):
    module, a, b = _pair([6, 10, 8, 3])
    ds = ckptscope.linear_path(a, b, module, data, alphas=3, align="activations",
                               repair=True, groups=["layers.0"])
    assert ds.attrs["repair"] == "rescale" and ds.attrs["align"] == "activations"
    aligned = alignment(a, b, module, method="activations", data=data["train"][0]).state
    x, y = data["test"]
    ends = ckptscope.linear_path(a, aligned, module, data, alphas=3)
    whole = ds.loss.sel(group="all").values[0, 0]
    assert whole[0] == ends.loss.sel(group="all").values[0, 0, 0]
    assert whole[-1] == ends.loss.sel(group="all").values[0, 0, -1]
    # the midpoint is the repaired state, evaluated the slow way
    train = data["train"][0]
    layers = hidden_layers(module)
    stats = tuple(layer_stats(module, s, train, layers) for s in (a, aligned))
    mid = repair_state(module, path_state(a, aligned, 0.5), 0.5, stats, train, layers)
    want, _ = reference_path(module, mid, mid, list(a), [0.0], x, y)
    np.testing.assert_allclose(whole[1], want[0], rtol=1e-5)
    assert whole[1] != ends.loss.sel(group="all").values[0, 0, 1]
    path = tmp_path / "r.nc"
    ckptscope.save_result(ds, path)
    back = ckptscope.open_result(path)
    assert back.attrs["repair"] == "rescale" and back.attrs["align_seed"] == 0


def test_linear_path_repair_with_batchnorm_recomputes_the_statistics(data):
    module, a, b = _pair([6, 10, 8, 3], batchnorm=True)
    ds = ckptscope.linear_path(a, b, module, data, alphas=3, repair=True)
    assert ds.attrs["repair"] == "bn-recompute" and ds.attrs["bn_policy"] == "recompute"
    plain = ckptscope.linear_path(a, b, module, data, alphas=3, bn="recompute")
    np.testing.assert_array_equal(ds.loss.values, plain.loss.values)


def test_linear_path_refuses_an_unknown_alignment(data):
    module, a, b = _pair([6, 10, 8, 3])
    with pytest.raises(CkptscopeError, match=r"align='magic' is not one of \('weights'"):
        ckptscope.linear_path(a, b, module, data, align="magic")


def test_repair_refuses_a_hidden_layer_without_bias():
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(CkptscopeError, match=r"bias of '0', which has none"):
        hidden_layers(model)


def test_linear_path_refuses_repair_with_batch_statistics(data):
    module, a, b = _pair([6, 10, 8, 3], batchnorm=True)
    with pytest.raises(CkptscopeError, match=r"repair=True re-estimates BatchNorm statistics"):
        ckptscope.linear_path(a, b, module, data, repair=True, bn="batch")
