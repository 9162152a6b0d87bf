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


class MaskedMLP(torch.nn.Module):
    """A 2-16-1 MLP whose first layer is pruned by a bool mask buffer."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(2, 16), torch.nn.Linear(16, 1)
        self.register_buffer("mask", torch.ones(16, 2, dtype=torch.bool))

    def forward(self, x):
        w = self.l1.weight * self.mask
        return self.l2(torch.relu(torch.nn.functional.linear(x, w, self.l1.bias)))


def _masked_pair():
    from tests.conftest import perturbed

    torch.manual_seed(0)
    module = MaskedMLP()
    a = {k: v.clone() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    a["mask"] = torch.rand(16, 2, generator=g) > 0.5
    b = perturbed({k: v for k, v in a.items() if k != "mask"}, 0.5, 2)
    b["mask"] = ~a["mask"]
    return module, a, b


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("hold", ["end", "start"])
def test_whole_model_path_ends_at_the_checkpoints_when_a_bool_mask_differs(spiral_small,
                                                                            strategy, hold):
    """#13 item 3: L_all(0) = L(A) and L_all(1) = L(B) bitwise, whatever ``hold`` is."""
    module, a, b = _masked_pair()
    x, y = spiral_small["test"]
    # One point per vectorised pass and one loss call per batch, so that every evaluation
    # below does the same arithmetic in the same order.
    config = ckptscope.EvalConfig(strategy=strategy, batch_size=64, memory_budget=1)
    kwargs = dict(groups={"first": "l1\\."}, alphas=5, loss="bce", hold=hold, config=config)
    ds = ckptscope.linear_path(a, b, module, spiral_small, **kwargs)
    at_a = ckptscope.linear_path(a, a, module, spiral_small, **kwargs)
    at_b = ckptscope.linear_path(b, b, module, spiral_small, **kwargs)
    whole = ds.loss.sel(group="all").values[0, 0]
    assert whole[0] == at_a.loss.sel(group="all").values[0, 0, 0]
    assert whole[-1] == at_b.loss.sel(group="all").values[0, 0, -1]
    np.testing.assert_allclose(whole[0], plain_eval(module, a, x, y, loss="bce")[0][0], rtol=1e-6)
    np.testing.assert_allclose(whole[-1], plain_eval(module, b, x, y, loss="bce")[0][0], rtol=1e-6)
    # The mask matters: A's weights under B's mask are another model.
    other = plain_eval(module, {**a, "mask": b["mask"]}, x, y, loss="bce")[0][0]
    assert abs(other - whole[0]) > 1e-3
    # A group path takes the mask from the held end, at every alpha.
    held = b if hold == "end" else a
    start = {**held, "l1.weight": a["l1.weight"], "l1.bias": a["l1.bias"]}
    first = ds.loss.sel(group="first").values[0, 0]
    np.testing.assert_allclose(first[0], plain_eval(module, start, x, y, loss="bce")[0][0],
                               rtol=1e-6)


def _counting(calls: list, fn):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted


def test_a_sweep_loads_the_data_builds_the_evaluator_and_traces_once(mlp_pair, monkeypatch):
    from ckptscope import inputs, linear
    from ckptscope.engine import evaluator
    from tests.conftest import perturbed

    _, a, b = mlp_pair
    loads, built, traces = [], [], []
    monkeypatch.setattr(inputs, "load_data", _counting(loads, inputs.load_data))
    monkeypatch.setattr(linear, "Evaluator", _counting(built, linear.Evaluator))
    monkeypatch.setattr(evaluator, "trace", _counting(traces, evaluator.trace))
    pairs = {f"seed{i}": (perturbed(a, 0.1, i), perturbed(b, 0.1, 10 + i)) for i in range(3)}
    kwargs = dict(groups=["layers.1", "layers.2"], alphas=3)
    ds = ckptscope.linear_paths(pairs, "mlp", "spiral:100,80", **kwargs)
    assert (len(loads), len(built), len(traces)) == (1, 1, 1)
    assert list(ds.run.values) == list(pairs)
    for label, (start, end) in pairs.items():  # the same curves as one pair at a time
        one = ckptscope.linear_path(start, end, "mlp", "spiral:100,80", run=label, **kwargs)
        np.testing.assert_array_equal(ds.loss.sel(run=label).values, one.loss.values[0])


def test_a_sweep_builds_an_evaluator_per_model(mlp_pair, monkeypatch):
    from ckptscope import inputs, linear
    from ckptscope.adapters.mlp import MLP

    _, a, b = mlp_pair
    narrow = {k: v.clone() for k, v in MLP([2, 8, 1]).state_dict().items()}
    loads, built = [], []
    monkeypatch.setattr(inputs, "load_data", _counting(loads, inputs.load_data))
    monkeypatch.setattr(linear, "Evaluator", _counting(built, linear.Evaluator))
    pairs = {"wide": (a, b), "narrow": (narrow, narrow), "wide again": (b, a)}
    # Each pair is evaluated on an evaluator for its own model (one per width, one data set);
    # runs of two models are not one result, which merging then says.
    with pytest.raises(CkptscopeError, match="cannot merge narrow.*adapter_options"):
        ckptscope.linear_paths(pairs, "mlp", "spiral:100,80", alphas=2)
    assert (len(loads), len(built)) == (1, 2)


@pytest.mark.parametrize("config, keyword", [
    ({"bn": "batch"}, "bn="), ({"dtype": torch.float64}, "dtype="),
    ({"autocast": torch.bfloat16}, "dtype="), ({"device": "cpu:0"}, "device="),
])
def test_linear_path_takes_device_dtype_and_bn_from_its_own_keywords(mlp_pair, spiral_small,
                                                                     config, keyword):
    module, a, b = mlp_pair
    with pytest.raises(CkptscopeError, match=f"config sets .*own {keyword} keyword"):
        ckptscope.linear_path(a, b, module, spiral_small, alphas=2, loss="bce",
                              config=ckptscope.EvalConfig(**config))
