"""Building, saving (atomically) and opening result datasets."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

from ckptscope.errors import CkptscopeError
from ckptscope.results import RunInfo, build_result, merge_results, open_result, save_result

RESULT_ARGS = {}


def make_result(n_alpha=5, groups=("all", "fc"), splits=("test",)):
    rng = np.random.default_rng(0)
    shape = (1, len(groups), len(splits), n_alpha)
    return build_result(
        loss=rng.random(shape),
        accuracy=rng.random(shape),
        distance=rng.random((1, len(groups))),
        alphas=np.linspace(0, 1, n_alpha),
        groups=list(groups),
        patterns=[".*", "fc"][: len(groups)],
        n_tensors=[4, 2][: len(groups)],
        n_params=[100, 10][: len(groups)],
        splits=list(splits),
        n_examples=[50] * len(splits),
        runs=[RunInfo("0", "a.pt", "b.pt", "aa", "bb")],
        attrs={"adapter": "mlp", "hold": "end"},
    )


def test_save_open_roundtrip_identical(tmp_path):
    ds = make_result()
    path = save_result(ds, tmp_path / "r.nc")
    back = open_result(path)
    assert back.identical(ds)
    with xr.open_dataset(path) as plain:
        assert plain.load().identical(ds)
    assert os.listdir(tmp_path) == ["r.nc"]


def test_save_result_failure_leaves_nothing(tmp_path, monkeypatch):
    ds = make_result()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", boom)
    with pytest.raises(RuntimeError):
        save_result(ds, tmp_path / "r.nc")
    assert os.listdir(tmp_path) == []


def test_save_result_replaces_existing_file(tmp_path):
    path = tmp_path / "r.nc"
    save_result(make_result(n_alpha=3), path)
    save_result(make_result(n_alpha=7), path)
    assert open_result(path).sizes["alpha"] == 7


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda ds: ds.drop_vars("loss"), "variable 'loss' is missing"),
        (lambda ds: ds.assign(accuracy=ds.accuracy * 3), "outside"),
        (lambda ds: ds.assign_coords(alpha=ds.alpha[::-1].values), "increasing"),
        (lambda ds: ds.assign(loss=ds.loss.transpose("alpha", ...)), "dims"),
        (lambda ds: ds.assign_attrs(ckptscope_schema=99), "newer"),
    ],
)
def test_open_result_validates(tmp_path, mutate, match):
    path = tmp_path / "bad.nc"
    mutate(make_result()).to_netcdf(path, engine="scipy")
    with pytest.raises(CkptscopeError, match=match):
        open_result(path)


def test_open_result_not_netcdf(tmp_path):
    path = tmp_path / "x.nc"
    path.write_text("not netcdf")
    with pytest.raises(CkptscopeError, match="not a readable NetCDF"):
        open_result(path)
    with pytest.raises(CkptscopeError, match="does not exist"):
        open_result(tmp_path / "missing.nc")


def test_build_result_rejects_attrs_netcdf_cannot_store():
    with pytest.raises(TypeError, match="'flag' is a bool"):
        build_result(**{**RESULT_ARGS, "attrs": {"flag": True}})


def test_merge_results_joins_runs_and_relabels_repeats():
    a, b = make_result(), make_result()
    merged = merge_results([a, b], sources=["a.nc", "b.nc"])
    assert merged.sizes["run"] == 2
    assert list(merged.run.values) == ["0:0", "1:0"]
    np.testing.assert_array_equal(merged.loss.values[1], b.loss.values[0])
    assert merged.attrs["merged_from"] == "a.nc, b.nc"


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: make_result(n_alpha=6), "alpha grid"),
        (lambda: make_result(groups=("all",)), "groups"),
        (lambda: make_result(splits=("train",)), "splits"),
    ],
)
def test_merge_results_refuses_disagreeing(other, match):
    with pytest.raises(CkptscopeError, match=match):
        merge_results([make_result(), other()])


RESULT_ARGS.update(
    loss=np.zeros((1, 1, 1, 2)),
    accuracy=np.zeros((1, 1, 1, 2)),
    distance=np.zeros((1, 1)),
    alphas=[0, 1],
    groups=["all"],
    patterns=[".*"],
    n_tensors=[1],
    n_params=[1],
    splits=["test"],
    n_examples=[1],
    runs=[RunInfo("0")],
)


def test_merge_results_refuses_other_measurement_settings():
    other = make_result().assign_attrs(hold="start")
    with pytest.raises(CkptscopeError, match="hold='start'"):
        merge_results([make_result(), other])


@pytest.mark.parametrize(
    "first, other, match",
    [
        ({}, {"adapter": "vgg11"}, "adapter='vgg11'"),
        ({"adapter_options": '{"widths": [2, 50, 1]}'}, {"adapter_options": '{"widths": [2, 9, 1]}'},
         "adapter_options"),
        ({"bn_policy": "batch", "batch_size": 64}, {"bn_policy": "batch", "batch_size": 32},
         "batch_size=32"),
        ({"bn_policy": "recompute", "batch_size": 64}, {"bn_policy": "recompute", "batch_size": 8},
         "batch_size=8"),
    ],
)
def test_merge_results_refuses_runs_measured_another_way(first, other, match):
    with pytest.raises(CkptscopeError, match=match):
        merge_results([make_result().assign_attrs(first),
                       make_result().assign_attrs({**first, **other})])


def test_merge_results_lists_provenance_that_differs():
    a = make_result().assign_attrs(bn_policy="interpolate", batch_size=64, device="cpu")
    b = make_result().assign_attrs(bn_policy="interpolate", batch_size=32, device="cpu")
    merged = merge_results([a, b])  # the batch size does not change interpolated-BN curves
    assert merged.attrs["batch_size"] == "64, 32"
    assert merged.attrs["device"] == "cpu"


def test_merge_results_refuses_runs_of_other_model_code(tmp_path):
    import torch
    from torch import nn

    import ckptscope

    def net(act):
        class Net(nn.Module):  # one name, one repr: only the code tells them apart
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 2)

            def forward(self, x):
                return act(self.fc(x))

        return Net()

    torch.manual_seed(0)
    state = net(torch.tanh).state_dict()
    data = (torch.randn(8, 2), torch.randint(0, 2, (8,)))
    tanh = ckptscope.linear_path(state, state, net(torch.tanh), data, alphas=3, run="a")
    relu = ckptscope.linear_path(state, state, net(torch.relu), data, alphas=3, run="b")
    assert tanh.attrs["model_identity"] == ckptscope.linear_path(
        state, state, net(torch.tanh), data, alphas=3).attrs["model_identity"]
    with pytest.raises(CkptscopeError, match="model_identity"):
        merge_results([tanh, relu])
