"""linear_path end to end: semantics, provenance, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ckptscope
from ckptscope.checkpoints import save_checkpoint
from ckptscope.errors import CkptscopeError
from tests.reference import plain_eval, reference_path


def test_linear_path_contract(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    ds = ckptscope.linear_path(
        a,
        b,
        module,
        spiral_small,
        groups=["layers.0", "out=layers\\.2\\."],
        alphas=5,
        loss="bce",
        split="both",
    )
    assert ds.loss.dims == ("run", "group", "split", "alpha")
    assert list(ds.group.values) == ["all", "layers.0", "out"]
    assert list(ds.pattern.values) == [".*", "layers.0", "layers\\.2\\."]
    assert list(ds.split.values) == ["test", "train"]
    np.testing.assert_array_equal(ds.alpha.values, np.linspace(0, 1, 5))
    assert ds.distance.dims == ("run", "group")
    assert ((ds.accuracy >= 0) & (ds.accuracy <= 1)).all()
    for attr in (
        "ckptscope_version",
        "torch_version",
        "device",
        "dtype",
        "adapter",
        "data",
        "bn_policy",
        "hold",
        "created",
    ):
        assert attr in ds.attrs


def test_linear_path_endpoints_equal_plain_evaluation(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    x, y = spiral_small["test"]
    ds = ckptscope.linear_path(
        a, b, module, spiral_small, groups=["layers.1"], alphas=3, loss="bce"
    )
    for i, state in ((0, a), (-1, b)):
        want, acc = plain_eval(module, state, x, y, loss="bce")
        np.testing.assert_allclose(ds.loss.sel(group="all").values[0, 0, i], want[0], rtol=1e-6)
        assert ds.accuracy.sel(group="all").values[0, 0, i] == acc[0]
    # Group path at alpha=1 is B itself (the rest is held at B).
    np.testing.assert_allclose(
        ds.loss.sel(group="layers.1").values[0, 0, -1],
        ds.loss.sel(group="all").values[0, 0, -1],
        rtol=1e-6,
    )


@pytest.mark.parametrize("hold", ["end", "start"])
def test_linear_path_group_matches_reference(conv_pair, image_data, hold):
    module, a, b = conv_pair
    x, y = image_data["test"]
    ds = ckptscope.linear_path(
        a, b, module, image_data, groups={"bn": "bn\\."}, alphas=6, hold=hold, full=False
    )
    keys = [k for k in a if k.startswith("bn.")]
    want, _ = reference_path(module, a, b, keys, ds.alpha.values, x, y, hold=hold)
    np.testing.assert_allclose(ds.loss.values[0, 0, 0], want, rtol=1e-5)
    assert ds.attrs["hold"] == hold


def test_linear_path_distance_eq4_parameters_only(conv_pair, image_data):
    module, a, b = conv_pair
    ds = ckptscope.linear_path(a, b, module, image_data, groups={"bn": "bn\\."}, alphas=2)
    params = ["bn.weight", "bn.bias"]  # running stats and num_batches_tracked excluded
    num = sum(float(((b[k].double() - a[k].double()) ** 2).sum()) for k in params)
    den = sum(float((a[k].double() ** 2).sum()) for k in params)
    assert ds.distance.sel(group="bn").item() == pytest.approx(np.sqrt(num / den), rel=1e-12)
    assert ds.n_params.sel(group="bn").item() == 8


def test_linear_path_from_files_uses_metadata(tmp_path, mlp_pair):
    module, a, b = mlp_pair
    meta = {
        "adapter": "mlp",
        "adapter_options": {"widths": [2, 16, 16, 1]},
        "data": "spiral:100,80",
    }
    pa = save_checkpoint(tmp_path / "init.safetensors", a, metadata=meta)
    pb = save_checkpoint(tmp_path / "final.safetensors", b, metadata=meta)
    ds = ckptscope.linear_path(pa, pb, alphas=3)
    assert ds.attrs["adapter"] == "mlp" and ds.attrs["data"] == "spiral:100,80"
    assert ds.attrs["loss_function"] == "bce"
    assert ds.start_path.item() == str(pa)
    assert len(ds.start_sha256.item()) == 64
    assert int(ds.n_examples.item()) == 80


def test_linear_path_infers_mlp_widths_without_metadata(mlp_pair):
    _, a, b = mlp_pair
    ds = ckptscope.linear_path(a, b, "mlp", "spiral:50,40", alphas=2)
    assert ds.attrs["adapter_options"] == '{"widths": [2, 16, 16, 1]}'


def test_linear_path_fp16_checkpoint_evaluates_in_float32(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    half = {k: v.half() for k, v in b.items()}
    ds = ckptscope.linear_path(a, half, module, spiral_small, alphas=2, loss="bce")
    assert ds.attrs["dtype"] == "float32"
    assert "upcast" in ds.attrs["notes"]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_linear_path_nan_weights_warn_and_keep_nan(mlp_pair, spiral_small, strategy):
    module, a, b = mlp_pair
    b = dict(b)
    b["layers.0.weight"] = b["layers.0.weight"].clone()
    b["layers.0.weight"][0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        ds = ckptscope.linear_path(
            a, b, module, spiral_small, alphas=3, loss="bce",
            config=ckptscope.EvalConfig(strategy=strategy),
        )
    assert np.isnan(ds.loss.values[0, 0, 0, -1])
    assert np.isfinite(ds.loss.values[0, 0, 0, 0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": None}, "name no adapter"),
        ({"model": "resnet9000"}, "unknown adapter 'resnet9000'"),
        ({"model": "mlp", "data": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"model": "mlp", "data": "spiral", "groups": ["nothing"]}, "matched no tensor"),
        ({"model": "mlp", "data": "spiral", "hold": "middle"}, "hold"),
        (
            {"model": "mlp", "data": "spiral", "adapter_options": {"widths": [2, 5, 1]}},
            "do not match",
        ),
        ({"model": "mlp", "data": "spiral", "adapter_options": {"depth": 3}}, "bad options"),
        ({"model": "mlp", "data": "nosuchmodule.sub:thing"}, "cannot import"),
    ],
)
def test_linear_path_bad_input(mlp_pair, kwargs, match):
    _, a, b = mlp_pair
    with pytest.raises(CkptscopeError, match=match):
        ckptscope.linear_path(a, b, **{"alphas": 2, **kwargs})


def test_linear_path_mismatched_pair(mlp_pair):
    module, a, b = mlp_pair
    b = {k: v for k, v in b.items() if k != "layers.0.bias"}
    with pytest.raises(CkptscopeError, match="only in start: layers.0.bias"):
        ckptscope.linear_path(a, b, module, "spiral", alphas=2)


def test_linear_path_custom_data_and_adapter_by_import(mlp_pair):
    _, a, b = mlp_pair
    ds = ckptscope.linear_path(
        a, b, "tests.plugins:make_mlp", "tests.plugins:tiny_spiral", alphas=2, loss="bce"
    )
    assert ds.attrs["adapter"] == "tests.plugins:make_mlp"
    assert list(ds.split.values) == ["eval"]


def test_linear_path_extrapolation_grid(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    ds = ckptscope.linear_path(a, b, module, spiral_small, alphas=[-0.5, 0, 1, 1.5], loss="bce")
    assert ds.alpha.values.tolist() == [-0.5, 0, 1, 1.5]
    assert np.isfinite(ds.loss.values).all()


def test_linear_path_batch_size_does_not_change_result(conv_pair, image_data):
    module, a, b = conv_pair
    r = [
        ckptscope.linear_path(a, b, module, image_data, alphas=4,
                              config=ckptscope.EvalConfig(batch_size=bs)).loss.values
        for bs in (5, 37)
    ]
    np.testing.assert_allclose(r[0], r[1], rtol=1e-6)


def test_import_leaves_matplotlib_and_click_out():
    import subprocess
    import sys

    code = (
        "import sys, ckptscope; "
        "print(sorted(m for m in ('matplotlib', 'click') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_linear_path_autocast_close_to_float32(conv_pair, image_data, dtype):
    module, a, b = conv_pair
    if dtype == "fp16" and not torch.cuda.is_available():
        pytest.skip("float16 autocast needs CUDA")
    full = ckptscope.linear_path(a, b, module, image_data, alphas=5)
    low = ckptscope.linear_path(a, b, module, image_data, alphas=5, dtype=dtype)
    assert low.attrs["dtype"] == dtype
    np.testing.assert_allclose(low.loss.values, full.loss.values, rtol=1e-2)
    assert not np.array_equal(low.loss.values, full.loss.values)  # autocast was really on
