"""Big pairs: checkpoints are held as stored (memory-mapped, half precision kept), points are
computed per tensor in the evaluation dtype, and the evaluator runs one copy of the weights."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptscope
from ckptscope import points as points_module
from ckptscope.checkpoints import as_checkpoint, load_checkpoint
from ckptscope.distance import distance_table
from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.errors import CkptscopeError
from ckptscope.points import combine, path_state, write_point, write_tensor
from tests.conftest import SmallConvNet, perturbed, run_path

HALF = [torch.bfloat16, torch.float16]


def _half(state: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _upcast(state: dict) -> dict:
    """The whole-state float32 copy that ckptscope no longer makes: the slow reference."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``t``'s bytes, from /proc/self/maps, or None."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_load_checkpoint_safetensors_is_memory_mapped_in_its_dtype(tmp_path, mlp_pair, dtype):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps (Linux)")
    _, a, _ = mlp_pair
    path = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in _half(a, dtype).items()}, str(path))
    ckpt = load_checkpoint(path)
    for key, value in ckpt.state.items():
        assert value.dtype == (dtype if a[key].is_floating_point() else a[key].dtype)
        assert _mapped_file(value) == str(path.resolve()), key  # the file's pages, not a copy


def test_load_checkpoint_torch_zip_is_memory_mapped(tmp_path, mlp_pair):
    _, a, _ = mlp_pair
    path = tmp_path / "a.pt"
    torch.save(_half(a, torch.bfloat16), path)
    ckpt = load_checkpoint(path)
    weight = ckpt.state["layers.0.weight"]
    assert weight.dtype == torch.bfloat16
    assert _mapped_file(weight) == str(path.resolve())


def test_load_checkpoint_mapped_tensor_written_does_not_change_the_file(tmp_path, mlp_pair):
    _, a, _ = mlp_pair
    path = tmp_path / "a.safetensors"
    save_file(a, str(path))
    load_checkpoint(path).state["layers.0.weight"][0, 0] = 123.0
    assert load_checkpoint(path).state["layers.0.weight"][0, 0] == a["layers.0.weight"][0, 0]


def test_load_checkpoint_note_names_the_kept_dtype(tmp_path, mlp_pair):
    _, a, _ = mlp_pair
    path = tmp_path / "a.safetensors"
    save_file(_half(a, torch.bfloat16), str(path))
    notes = load_checkpoint(path).notes
    assert len(notes) == 1
    assert "bfloat16" in notes[0] and "upcast" in notes[0] and "one tensor at a time" in notes[0]


@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_write_point_mixed_dtypes_equals_combine(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (), (2, 3, 4)]
    anchors = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(3)]
    # Mixed within one point: one tensor already in the target's dtype.
    anchors[0][1] = anchors[0][1].float()
    anchors[1][1], anchors[2][1] = anchors[1][1].float(), anchors[2][1].float()
    for w in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.7, 0.0], [0.2, -0.5, 1.3]):
        targets = [torch.full(s, float("nan")) for s in shapes]
        write_point(targets, anchors, np.array(w))
        for i, t in enumerate(targets):
            values = [src[i] for src in anchors]
            # Each anchor's tensor in the target's dtype (float64 rounded, half upcast).
            expected = combine([v.float() for v in values], w)
            assert t.dtype == torch.float32
            assert torch.equal(t, expected), (w, i)
    for w in ([0.6, 0.4], [-0.5, 1.5]):  # the two-anchor line: lerp
        targets = [torch.full(s, float("nan")) for s in shapes]
        write_point(targets, anchors[:2], np.array(w))
        for i, t in enumerate(targets):
            expected = combine([src[i].float() for src in anchors[:2]], w)
            assert torch.equal(t, expected), (w, i)


def test_write_tensor_in_blocks_equals_whole(monkeypatch):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(37, 64, generator=g).bfloat16()
    b = torch.randn(37, 64, generator=g).bfloat16()
    whole = torch.empty(37, 64)
    write_tensor(whole, [a, b], [0.75, 0.25])
    monkeypatch.setattr(points_module, "UPCAST_BLOCK", 64 * 5)  # 8 blocks of 5 rows
    assert len(points_module._row_blocks(whole)) == 8
    for w in ([0.75, 0.25], [0.5, 0.5], [0.6, 0.6]):
        blocked = torch.empty(37, 64)
        write_tensor(blocked, [a, b], w)
        assert torch.equal(blocked, combine([a, b], w)), w


def test_combine_upcasts_half_precision_to_float32():
    a = torch.tensor([1.0, 2.0]).bfloat16()
    b = torch.tensor([3.0, 2.5]).bfloat16()
    assert combine([a, b], [0.5, 0.5]).dtype == torch.float32
    assert combine([a, b], [1.0, 0.0]).dtype == torch.float32
    assert torch.equal(combine([a, b], [0.9, 0.1]), torch.lerp(a.float(), b.float(), 0.1))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_pair_equals_the_upcast_pair(conv_pair, image_data, strategy, dtype):
    module, a, b = conv_pair
    ha, hb = _half(a, dtype), _half(b, dtype)
    config = EvalConfig(strategy=strategy, batch_size=16)
    alphas = np.linspace(-0.25, 1.25, 7)
    groups = [list(a), [k for k in a if k.startswith("conv.")], [k for k in a if "bn" in k]]
    for keys in groups:
        ev_half = Evaluator(module, image_data, loss="cross_entropy", config=config)
        ev_ref = Evaluator(module, image_data, loss="cross_entropy", config=config)
        got = run_path(ev_half, ha, hb, keys, alphas)
        want = run_path(ev_ref, _upcast(ha), _upcast(hb), keys, alphas)
        for split in got:
            np.testing.assert_array_equal(got[split][0], want[split][0])
            np.testing.assert_array_equal(got[split][1], want[split][1])


def test_half_precision_linear_path_equals_a_slow_reference(tmp_path, conv_pair, image_data):
    module, a, b = conv_pair
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_half(a, torch.bfloat16), str(pa))
    save_file(_half(b, torch.bfloat16), str(pb))
    alphas = [0.0, 0.3, 1.0]
    ds = ckptscope.linear_path(pa, pb, module, image_data, alphas=alphas,
                               groups={"conv": "conv"}, config=EvalConfig(batch_size=37))
    assert "bfloat16" in ds.attrs["notes"] and "upcast" in ds.attrs["notes"]
    ha, hb = load_checkpoint(pa).state, load_checkpoint(pb).state
    x, y = image_data["test"]
    model = copy.deepcopy(module).eval()
    for group, keys in (("all", None), ("conv", ["conv.weight", "conv.bias"])):
        for i, alpha in enumerate(alphas):
            # The plain way: the state at alpha (each tensor upcast, then lerp), loaded.
            model.load_state_dict(path_state(ha, hb, alpha, keys=keys))
            with torch.no_grad():
                want = float(nn.functional.cross_entropy(model(x), y))
            got = float(ds.loss.sel(group=group, split="test").isel(alpha=i, run=0))
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (group, alpha)


def test_evaluator_does_not_copy_cpu_anchors(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    ev = Evaluator(module, spiral_small, loss="bce", config=EvalConfig())
    for state in (a, _half(a, torch.bfloat16)):
        placed = ev.context.place(state)
        assert all(placed[k] is state[k] or placed[k].data_ptr() == state[k].data_ptr()
                   for k in state)
        assert all(placed[k].dtype == state[k].dtype for k in state)


def test_evaluator_copies_a_user_module_and_owns_an_adapters(mlp_pair, spiral_small):
    module, a, _ = mlp_pair
    before = {k: v.clone() for k, v in module.state_dict().items()}
    ev = Evaluator(module, spiral_small, loss="bce", config=EvalConfig())
    assert ev.module is not module
    run_path(ev, perturbed(a, 1.0, 5), a, list(a), [0.5])
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    own = Evaluator(module, spiral_small, loss="bce", config=EvalConfig(), own_module=True)
    assert own.module is module


def test_linear_path_adapter_module_is_built_once(monkeypatch, mlp_pair, spiral_small):
    _, a, b = mlp_pair
    copies, depth = [], 0
    real = copy.deepcopy

    def counting(obj, *args, **kwargs):  # the outermost copies of modules
        nonlocal depth
        if depth == 0 and isinstance(obj, nn.Module):
            copies.append(type(obj).__name__)
        depth += 1
        try:
            return real(obj, *args, **kwargs)
        finally:
            depth -= 1

    monkeypatch.setattr("ckptscope.engine.context.copy.deepcopy", counting)
    ds = ckptscope.linear_path(a, b, "mlp", spiral_small, alphas=3, loss="bce")
    assert copies == []  # the adapter's module is the evaluator's own
    ref = ckptscope.linear_path(a, b, MLPFor(a), spiral_small, alphas=3, loss="bce")
    assert copies == ["MLP"]  # a user's module is copied
    np.testing.assert_array_equal(ds.loss.values, ref.loss.values)
    assert ds.attrs["model_identity"] == ref.attrs["model_identity"]


def MLPFor(state: dict) -> nn.Module:  # noqa: N802 - reads as a constructor
    from ckptscope.adapters.mlp import MLP

    return MLP([2, 16, 16, 1])


def test_linear_path_float64_with_own_module_keeps_identity(mlp_pair, spiral_small):
    _, a, b = mlp_pair
    single = ckptscope.linear_path(a, b, "mlp", spiral_small, alphas=2, loss="bce")
    double = ckptscope.linear_path(a, b, "mlp", spiral_small, alphas=2, loss="bce",
                                   dtype="float64")
    assert single.attrs["model_identity"] == double.attrs["model_identity"]
    np.testing.assert_allclose(single.loss.values, double.loss.values, rtol=1e-5)


def test_meta_module_equals_the_cpu_module(conv_pair, image_data):
    module, a, b = conv_pair
    with torch.device("meta"):
        skeleton = SmallConvNet()
    got = ckptscope.linear_path(a, b, skeleton, image_data, alphas=3, groups={"fc": "fc"})
    want = ckptscope.linear_path(a, b, module, image_data, alphas=3, groups={"fc": "fc"})
    np.testing.assert_array_equal(got.loss.values, want.loss.values)
    np.testing.assert_array_equal(got.accuracy.values, want.accuracy.values)


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("mask", torch.ones(3), persistent=False)

    def forward(self, x):
        return self.fc(x) * self.mask


def test_meta_module_with_unsaved_buffers_is_refused():
    with torch.device("meta"):
        skeleton = _Masked()
    a = {k: torch.randn(v.shape) for k, v in skeleton.state_dict().items()}
    data = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    with pytest.raises(CkptscopeError, match=r"meta device.*mask.*not saved.*build the module"):
        ckptscope.linear_path(a, a, skeleton, data, alphas=2)


def test_distances_of_half_precision_pair_equal_the_upcast_pair(mlp_pair, monkeypatch):
    from ckptscope import distance as distance_module

    _, a, b = mlp_pair
    ha, hb = as_checkpoint(_half(a, torch.bfloat16)), as_checkpoint(_half(b, torch.bfloat16))
    got = distance_table(ha, hb)
    want = distance_table(_upcast(ha.state), _upcast(hb.state))
    assert got == want
    monkeypatch.setattr(distance_module, "MOMENT_BLOCK", 7)  # many blocks per tensor
    blocked = distance_table(ha, hb)
    for name in ("relative", "l2", "cosine"):
        np.testing.assert_allclose(blocked[name], want[name], rtol=1e-12)


def _counting_adapter(builds: list):
    from ckptscope.adapters import Adapter

    def build():
        builds.append(1)
        return SmallConvNet()

    return Adapter(name="small-conv", build=build)


@pytest.mark.parametrize("bn", ["interpolate", "batch"])
def test_linear_paths_builds_an_adapters_module_once(conv_pair, image_data, bn):
    _, a, b = conv_pair
    c = perturbed(b, 0.2, 9)
    builds: list = []
    adapter = _counting_adapter(builds)
    pairs = {"ab": (a, b), "ac": (a, c)}
    ds = ckptscope.linear_paths(pairs, adapter, image_data, alphas=3, bn=bn,
                                groups={"fc": "fc"})
    assert len(builds) == 1
    for label, (start, end) in pairs.items():
        one = ckptscope.linear_path(start, end, adapter, image_data, alphas=3, bn=bn,
                                    groups={"fc": "fc"})
        np.testing.assert_array_equal(ds.loss.sel(run=label).values, one.loss.values[0])
        assert one.attrs["model_identity"] == ds.attrs["model_identity"]


def test_linear_paths_checks_a_later_pair_against_the_built_layout(conv_pair, image_data):
    _, a, b = conv_pair
    short = {k: v for k, v in a.items() if k != "fc.bias"}
    adapter = _counting_adapter([])
    with pytest.raises(CkptscopeError, match=r"only in the model \(small-conv\): fc\.bias"):
        ckptscope.linear_paths([(a, b), (short, short)], adapter, image_data, alphas=2)


def test_half_precision_pair_in_float64_equals_the_float64_upcast(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    ha, hb = _half(a, torch.bfloat16), _half(b, torch.bfloat16)
    wide = [{k: v.double() if v.is_floating_point() else v for k, v in s.items()}
            for s in (ha, hb)]
    config = EvalConfig(strategy="loop", dtype=torch.float64)
    alphas = np.linspace(0, 1, 5)
    got = run_path(Evaluator(module, spiral_small, loss="bce", config=config), ha, hb,
                   list(a), alphas)
    want = run_path(Evaluator(module, spiral_small, loss="bce", config=config), *wide,
                    list(a), alphas)
    for split in got:
        np.testing.assert_array_equal(got[split][0], want[split][0])


def test_cli_path_on_bf16_files_matches_their_float32_upcast(tmp_path, mlp_pair, capsys):
    from ckptscope.checkpoints import save_checkpoint
    from ckptscope.cli import main
    from ckptscope.results import open_result

    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "data": "spiral:120,90"}
    files = {}
    for name, convert in (("half", lambda s: _half(s, torch.bfloat16)),
                          ("wide", lambda s: _upcast(_half(s, torch.bfloat16)))):
        files[name] = [save_checkpoint(tmp_path / f"{name}-{end}.safetensors", convert(s),
                                       metadata=meta) for end, s in (("a", a), ("b", b))]
        code = main(["path", *map(str, files[name]), "--preset", "layers", "--alphas", "5",
                     "--dtype", "float32", "--out", str(tmp_path / f"{name}.nc")])
        assert code == 0, capsys.readouterr().err
    half, wide = open_result(tmp_path / "half.nc"), open_result(tmp_path / "wide.nc")
    np.testing.assert_array_equal(half.loss.values, wide.loss.values)
    np.testing.assert_array_equal(half.distance.values, wide.distance.values)
    assert "bfloat16" in half.attrs["notes"] and "bfloat16" not in wide.attrs["notes"]
