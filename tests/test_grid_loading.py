"""Planes and surfaces through checkpoints other tools wrote: their keys are matched to the model
as a path's are (wrapper prefixes, tied names, BatchNorm counters), the notes are recorded in
the result and the CLI prints each once per file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ckptscope
from ckptscope.checkpoints import save_checkpoint
from ckptscope.cli import main
from ckptscope.errors import CkptscopeError
from ckptscope.grids import open_grid
from ckptscope.planes import plane
from ckptscope.surfaces import surface
from tests.conftest import perturbed
from tests.test_loading import ShiftNet, TiedLM, states, without


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(3)
    return torch.randint(11, (40,), generator=g), torch.randint(11, (40,), generator=g)


@pytest.fixture
def features():
    g = torch.Generator().manual_seed(4)
    return torch.randn(32, 4, generator=g), torch.randint(3, (32,), generator=g)


def _third(a: dict, seed: int) -> dict:
    """A third checkpoint off the line through the first two (a tie stays one tensor)."""
    c = perturbed(a, 0.4, seed)
    if "lm_head.weight" in c:
        c["lm_head.weight"] = c["wte.weight"]
    return c


def test_plane_through_ddp_files_equals_the_plane_of_the_states(tmp_path, features):
    module = ShiftNet()
    a, b = states(module, 0)
    c = _third(a, 5)
    want = plane(a, b, c, module, features, grid=3, groups=["fc"])
    paths = []
    for name, state in (("a", a), ("b", b), ("c", c)):
        paths.append(tmp_path / f"{name}.safetensors")
        save_file({"module." + k: v.contiguous() for k, v in state.items()}, str(paths[-1]))
    got = plane(*map(str, paths), module, features, grid=3, groups=["fc"])
    np.testing.assert_array_equal(got.loss.values, want.loss.values)
    np.testing.assert_array_equal(got.c.values, want.c.values)
    for path in paths:
        assert f"{path}: stripped prefix 'module.' from {len(a)} keys" in got.attrs["notes"]
    assert want.attrs["notes"] == ""


def test_plane_with_a_tie_saved_once_follows_it(tmp_path, tokens):
    module = TiedLM()
    a, b = states(module, 1)
    c = _third(a, 6)
    want = plane(a, b, c, module, tokens, grid=3, groups={"head": "lm_head", "h": "h"})
    b_path = tmp_path / "b.safetensors"  # save_pretrained's file: the alias left out
    save_file(without(b, "lm_head.weight"), str(b_path))
    got = plane(a, str(b_path), c, module, tokens, grid=3,
                groups={"head": "lm_head", "h": "h"})
    np.testing.assert_allclose(got.loss.values, want.loss.values, rtol=1e-6)
    np.testing.assert_array_equal(got.c.values, want.c.values)
    unique = ("wte.weight", "h.weight", "h.bias")  # the tie counts once
    assert int(got.n_params.sel(group="all")) == sum(a[k].numel() for k in unique)
    assert (f"{b_path}: lm_head.weight follows its tie to wte.weight (stored once"
            in got.attrs["notes"])


def test_plane_strips_a_lightning_prefix_and_an_asked_one(tmp_path, features):
    module = ShiftNet()
    a, b = states(module, 2)
    c = _third(a, 7)
    want = plane(a, b, c, module, features, grid=3)
    torch.save({"state_dict": {"model." + k: v for k, v in c.items()}, "epoch": 3},
               tmp_path / "c.ckpt")
    save_file({"net." + k: v.contiguous() for k, v in b.items()}, str(tmp_path / "b.st"))
    got = plane(a, str(tmp_path / "b.st"), str(tmp_path / "c.ckpt"), module, features, grid=3,
                strip_prefix="net")
    np.testing.assert_array_equal(got.loss.values, want.loss.values)
    notes = got.attrs["notes"]
    assert f"{tmp_path / 'b.st'}: stripped prefix 'net.' from {len(b)} keys (as asked)" in notes
    assert f"{tmp_path / 'c.ckpt'}: " in notes and "'model.'" in notes


def test_plane_with_a_prefix_on_no_file_is_refused(features):
    module = ShiftNet()
    a, b = states(module, 3)
    with pytest.raises(CkptscopeError, match=r"strip prefix 'net.' .* is not on every key"):
        plane(a, b, _third(a, 8), module, features, grid=3, strip_prefix="net.")


def test_plane_with_a_checkpoint_that_does_not_fit_is_refused(features):
    module = ShiftNet()
    a, b = states(module, 4)
    c = without(_third(a, 9), "fc.bias")
    with pytest.raises(CkptscopeError, match=r"fc.bias"):
        plane(a, b, c, module, features, grid=3)


def test_surface_matches_the_centre_and_the_direction_checkpoints(tmp_path, tokens):
    module = TiedLM()
    a, b = states(module, 5)
    c = _third(a, 10)
    want = surface(b, module, tokens, directions=(a, c), grid=3)
    center = tmp_path / "center.safetensors"
    save_file({"_orig_mod." + k: v.contiguous() for k, v in without(b, "lm_head.weight").items()},
              str(center))
    first = tmp_path / "a.safetensors"
    save_file(without(a, "lm_head.weight"), str(first))
    got = surface(str(center), module, tokens, directions=(str(first), c), grid=3)
    np.testing.assert_allclose(got.loss.values, want.loss.values, rtol=1e-6)
    notes = got.attrs["notes"]
    assert f"{center}: stripped prefix '_orig_mod.'" in notes
    assert f"{center}: lm_head.weight follows its tie to wte.weight (stored once)" in notes
    assert f"{first}: lm_head.weight follows its tie to wte.weight (stored once)" in notes


def test_plane_command_prints_each_note_once(tmp_path, capsys, mlp_pair):
    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 16, 16, 1]},
            "data": "spiral:60,40"}
    plain = [save_checkpoint(tmp_path / f"{n}.safetensors", s, metadata=meta)
             for n, s in (("a", a), ("c", perturbed(a, 0.4, 7)))]
    ddp = tmp_path / "b.pt"
    torch.save({"module." + k: v for k, v in b.items()}, ddp)
    out = tmp_path / "p.nc"
    code = main(["plane", str(plain[0]), str(ddp), str(plain[1]), "--grid", "3",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    line = f"note: {ddp}: stripped prefix 'module.' from {len(b)} keys"
    assert err.count(line) == 1, err
    assert f"{ddp}: stripped prefix 'module.'" in open_grid(out).attrs["notes"]


def test_plane_command_strip_prefix_option(tmp_path, capsys, mlp_pair):
    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 16, 16, 1]},
            "data": "spiral:60,40"}
    paths = [save_checkpoint(tmp_path / f"{n}.safetensors", {"net." + k: v for k, v in s.items()},
                             metadata=meta)
             for n, s in (("a", a), ("b", b), ("c", perturbed(a, 0.4, 7)))]
    code = main(["plane", *map(str, paths), "--grid", "3", "--strip-prefix", "net."])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count(f"note: {paths[1]}: stripped prefix 'net.'") == 1, err
    code = main(["plane", *map(str, paths), "--grid", "3", "--strip-prefix", "zz"])
    err = capsys.readouterr().err
    assert code == 2 and "error: strip prefix 'zz.'" in err and "Traceback" not in err


def _prefixed_run(folder, mlp_pair, prefix: str):
    """init, epoch_001 and final of the spiral MLP, every key under ``prefix``."""
    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 16, 16, 1]},
            "data": "spiral:60,40"}
    folder.mkdir()
    states = {"init": a, "epoch_001": perturbed(a, 0.2, 3), "final": b}
    for name, state in states.items():
        save_checkpoint(folder / f"{name}.safetensors",
                        {prefix + k: v for k, v in state.items()}, metadata=meta)
    return folder, states


def test_trajectory_strips_a_prefix_and_records_its_notes(tmp_path, mlp_pair):
    from ckptscope.trajectories import trajectory

    plain, _ = _prefixed_run(tmp_path / "plain", mlp_pair, "")
    net, _ = _prefixed_run(tmp_path / "net", mlp_pair, "net.")
    want = trajectory(plain, alphas=3, device="cpu")
    got = trajectory(net, alphas=3, device="cpu", strip_prefix="net.")
    np.testing.assert_array_equal(got.loss.values, want.loss.values)
    for name in ("init", "epoch_001", "final"):
        assert f"{net / name}.safetensors: stripped prefix 'net.'" in got.attrs["notes"]
    with pytest.raises(CkptscopeError, match=r"strip prefix 'zz.' .* is not on every key"):
        trajectory(net, alphas=3, device="cpu", strip_prefix="zz")


def test_trajectory_command_prints_each_note_once(tmp_path, capsys, mlp_pair):
    folder, _ = _prefixed_run(tmp_path / "ddp", mlp_pair, "module.")
    code = main(["trajectory", str(folder), "--alphas", "3", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    for name in ("init", "epoch_001", "final"):  # each file is in two or three pairs
        line = f"note: {folder / name}.safetensors: stripped prefix 'module.'"
        assert err.count(line) == 1, err


def test_surface_strips_a_prefix_only_the_centre_has(tmp_path, features):
    module = ShiftNet()
    a, b = states(module, 6)
    c = _third(a, 11)
    want = surface(b, module, features, directions=(a, c), grid=3)
    center = tmp_path / "center.safetensors"
    save_file({"net." + k: v.contiguous() for k, v in b.items()}, str(center))
    got = surface(str(center), module, features, directions=(a, c), grid=3, strip_prefix="net.")
    np.testing.assert_array_equal(got.loss.values, want.loss.values)
    assert f"{center}: stripped prefix 'net.' from {len(b)} keys (as asked)" in got.attrs["notes"]


def test_surface_command_prints_the_direction_files_notes_once(tmp_path, capsys, mlp_pair):
    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 16, 16, 1]},
            "data": "spiral:60,40"}
    center = save_checkpoint(tmp_path / "center.safetensors", b, metadata=meta)
    first = tmp_path / "a.pt"
    torch.save({"module." + k: v for k, v in a.items()}, first)
    second = save_checkpoint(tmp_path / "c.safetensors", perturbed(a, 0.4, 7), metadata=meta)
    code = main(["surface", str(center), "--directions", f"{first},{second}", "--grid", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count(f"note: {first}: stripped prefix 'module.' from {len(a)} keys") == 1, err


def test_linear_paths_strips_a_prefix_before_checking_loaded_checkpoints_metadata(
        tmp_path, mlp_pair):
    """Read checkpoints whose metadata names an adapter: the prefix is stripped before the
    adapter's shapes are checked against them (the early metadata check of linear_paths)."""
    from ckptscope.checkpoints import load_checkpoint

    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 16, 16, 1]},
            "data": "spiral:60,40"}
    paths = [save_checkpoint(tmp_path / f"{n}.safetensors", {"net." + k: v for k, v in s.items()},
                             metadata=meta) for n, s in (("a", a), ("b", b))]
    loaded = [load_checkpoint(p) for p in paths]
    got = ckptscope.linear_paths([tuple(loaded)], alphas=3, strip_prefix="net.")
    want = ckptscope.linear_path(*paths, alphas=3, strip_prefix="net.")
    np.testing.assert_array_equal(got.loss.values, want.loss.values)
