"""Spawning children from a parent's saved state (exact restore), and the instability test
built on it: its runs, its result and its command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptscope.checkpoints import load_checkpoint
from ckptscope.cli import main
from ckptscope.errors import CkptscopeError
from ckptscope.matrix_results import open_matrix
from ckptscope.train import run
from ckptscope.train.instability import child_dir, instability, parse_epochs, stability_table
from ckptscope.train.run import read_metrics
from ckptscope.train.spawn import state_path
from tests.conftest import spiral_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(**changes):
    return spiral_recipe(epochs=4, batch_size=16, **changes)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A parent of seed 3 (4 epochs of 4 Adam steps) that saved epochs 1 and 2."""
    torch.set_num_threads(1)
    return run(recipe(), seed=3, out=tmp_path_factory.mktemp("spawn") / "parent",
               save_every=[1, 2])


def same(a, b) -> bool:
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_spawn_with_the_parents_seed_reproduces_its_final_bit_for_bit(parent, epoch, tmp_path):
    source = parent.out / ("init.safetensors" if epoch == 0 else f"epoch_{epoch:03d}.safetensors")
    child = run(recipe(), seed=3, out=tmp_path / "child", spawn_from=source)
    assert same(child.final, parent.final)
    assert untimed(child.history) == untimed(parent.history)  # the parent's lines up to K


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
            for r in history]


def test_spawn_with_another_seed_differs_only_after_k(parent, tmp_path):
    child = run(recipe(), seed=4, out=tmp_path / "child",
                spawn_from=parent.out / "epoch_002.safetensors")
    assert not same(child.final, parent.final)
    assert child.history[:2] == read_metrics(parent.out / "metrics.jsonl")[:2]
    assert [r["epoch"] for r in child.history] == [1, 2, 3, 4]
    init = load_checkpoint(child.init)
    assert same(child.init, parent.out / "epoch_002.safetensors")  # the state it started at
    assert (init.metadata["epoch"], init.metadata["role"], init.metadata["seed"]) == (
        "2", "init", "4")
    notes = json.loads(load_checkpoint(child.final).metadata["init"])
    assert notes["spawn_epoch"] == 2 and notes["parent_seed"] == "3"
    assert notes["spawned_from"].endswith("epoch_002.safetensors")


def test_spawn_state_holds_the_optimizer_and_loads_as_weights_only(parent):
    saved = torch.load(state_path(parent.out / "epoch_001.safetensors"), weights_only=True)
    assert saved["epoch"] == 1 and saved["seed"] == 3
    assert saved["optimizer"]["state"]  # Adam's moments: without them a child would drift
    assert not (parent.out / "final.state.pt").exists()  # nothing to spawn at the end


def test_spawn_without_the_optimizer_state_would_not_be_exact(parent, tmp_path):
    """The restore is what makes the same-seed child exact: a fresh optimizer differs."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(parent.out, folder)
    saved = torch.load(state_path(folder / "epoch_002.safetensors"), weights_only=True)
    saved["optimizer"]["state"] = {}
    torch.save(saved, state_path(folder / "epoch_002.safetensors"))
    child = run(recipe(), seed=3, out=tmp_path / "child",
                spawn_from=folder / "epoch_002.safetensors")
    assert not same(child.final, parent.final)


@pytest.mark.parametrize(("source", "changes", "match"), [
    ("final.safetensors", {}, r"is not a run's init.safetensors or epoch_XXX.safetensors"),
    ("epoch_002.safetensors", {"lr": 0.1}, r"trained with another recipe \(lr: 0.0005 -> 0.1"),
    ("missing-state", {}, r"epoch_001.state.pt is missing: the optimizer state"),
    ("torn-state", {}, r"epoch_001.state.pt is not a readable spawn state"),
])
def test_spawn_bad_input_names_the_fix(parent, tmp_path, source, changes, match):
    import shutil

    folder = tmp_path / "parent"
    shutil.copytree(parent.out, folder)
    if source == "missing-state":
        state_path(folder / "epoch_001.safetensors").unlink()
    if source == "torn-state":
        state = state_path(folder / "epoch_001.safetensors")
        state.write_bytes(state.read_bytes()[:100])
    if source.endswith("-state"):
        source = "epoch_001.safetensors"
    with pytest.raises(CkptscopeError, match=match):
        run(recipe(**changes), seed=4, out=tmp_path / "child", spawn_from=folder / source)
    assert not (tmp_path / "child" / "final.safetensors").exists()


def test_instability_result_has_spawn_pair_and_copy_dims(tmp_path):
    seen = []
    out = instability(recipe(), spawn_at=[2, 0], copies=3, seed=0, out=tmp_path, alphas=5,
                      groups=["layers.0"], on_run=lambda label, r: seen.append(
                          (label, r.skipped)))
    ds = out.result
    assert dict(ds.sizes) == {"spawn": 2, "pair": 3, "group": 2, "split": 1, "alpha": 5,
                              "copy": 3}
    assert ds["spawn"].values.tolist() == [0, 2]
    assert [str(p) for p in ds["pair"].values] == ["0-1", "0-2", "1-2"]
    assert ds["loss"].dims == ("spawn", "pair", "group", "split", "alpha")
    assert ds["final_loss"].dims == ("spawn", "copy", "split")
    assert [label for label, _ in seen] == ["parent", "0/0", "0/1", "0/2", "2/0", "2/1", "2/2"]
    parent_files = sorted(p.name for p in (tmp_path / "parent").iterdir())
    assert "epoch_002.state.pt" in parent_files and "epoch_001.safetensors" not in parent_files
    for (k, c), child in out.children.items():
        meta = load_checkpoint(child.final).metadata
        assert meta["seed"] == str(1 + c) and json.loads(meta["init"])["spawn_epoch"] == k
        assert child.out == child_dir(tmp_path, k, c)
        # The final's loss: the trainer's own measurement of it, on the same test split.
        assert ds["final_loss"].sel(spawn=k, copy=c, split="test").item() == pytest.approx(
            child.last["test_loss"], rel=1e-5)
    # The children's seeds are the same at every K: copy c differs from its K-mates.
    assert not same(out.children[0, 0].final, out.children[0, 1].final)
    again = []
    instability(recipe(), spawn_at=[0, 2], copies=3, seed=0, out=tmp_path, alphas=5,
                groups=["layers.0"], on_run=lambda label, r: again.append(r.skipped))
    assert all(again)  # every run reused
    assert open_matrix(out.result_path).attrs["ckptscope_kind"] == "instability"
    rows = stability_table(ds)
    assert [r["spawn"] for r in rows] == [0, 2]
    assert rows[0]["error_barrier"] == pytest.approx(
        float(ds["error_barrier"].sel(spawn=0, group="all", split="test").mean()))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"spawn_at": [4]}, r"spawn epoch 4 is not before the recipe's last epoch \(4\)"),
    ({"spawn_at": [0], "copies": 1}, r"copies=1: the instability test compares two or more"),
    ({"spawn_at": [0], "child_seeds": [1, 1]}, r"must be 2 distinct seeds"),
    ({"spawn_at": "a,b"}, r"spawn epochs 'a,b' are not a list like 0,1,2,5"),
])
def test_instability_bad_input_names_the_fix(tmp_path, kwargs, match):
    with pytest.raises(CkptscopeError, match=match):
        instability(recipe(), out=tmp_path, **kwargs)
    assert not (tmp_path / "parent").exists()


def test_instability_from_a_parent_that_did_not_save_k(parent, tmp_path):
    with pytest.raises(CkptscopeError, match=r"lacks epoch_003.safetensors; spawn at the epochs"):
        instability(recipe(), spawn_at=[1, 3], parent=parent.out, out=tmp_path)


def test_parse_epochs_sorts():
    assert parse_epochs("5,0,2") == [0, 2, 5] and parse_epochs("0-2") == [0, 1, 2]


def test_instability_and_train_spawn_commands(parent, tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    assert main(["instability", "--recipe", "mlp-spiral-fig1a", "--set", "epochs=4",
                 "--set", "batch_size=16", "--set", "data='spiral:64,32'", "--spawn-at", "0,2",
                 "--parent", str(parent.out), "--seed", "3", "--out", str(tmp_path / "i"),
                 "--alphas", "3", "--device", "cpu", "--plot"]) == 0
    text = capsys.readouterr().out
    assert "error barrier %" in text and f"wrote {tmp_path / 'i' / 'instability.png'}" in text
    assert not (tmp_path / "i" / "parent").exists()  # the given parent was used
    args = ["train", "--recipe", "mlp-spiral-fig1a", "--set", "epochs=4", "--set",
            "batch_size=16", "--set", "data='spiral:64,32'", "--device", "cpu"]
    assert main([*args, "--seed", "3", "--out", str(tmp_path / "c"),
                 "--spawn-from", str(parent.out / "epoch_001.safetensors")]) == 0
    assert same(tmp_path / "c" / "final.safetensors", parent.final)
    assert main([*args, "--out", str(tmp_path / "d"),
                 "--spawn-from", str(parent.out / "final.safetensors")]) == 2
    assert "error: --spawn-from" in capsys.readouterr().err
    assert np.isfinite(open_matrix(tmp_path / "i" / "instability.nc")["error_barrier"]).all()


def test_instability_refuses_children_of_another_parent_in_its_folder(parent, tmp_path):
    import shutil

    instability(recipe(), spawn_at=[1], parent=parent.out, out=tmp_path / "i", alphas=3)
    other = tmp_path / "other"
    shutil.copytree(parent.out, other)
    shutil.copy(parent.out / "epoch_002.safetensors", other / "epoch_001.safetensors")
    with pytest.raises(CkptscopeError, match=r"copy_0 holds a child spawned from .*parent/"
                                             r"epoch_001.safetensors, not from .*other/epoch_001"):
        instability(recipe(), spawn_at=[1], parent=other, out=tmp_path / "i", alphas=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_spawn_on_cuda_with_the_parents_seed_reproduces_its_final(tmp_path):
    """The CUDA generator state travels in the spawn state too (augmentations draw on the
    CPU; this holds the restore on the device)."""
    parent = run(recipe(), seed=3, out=tmp_path / "parent", save_every=[2], device="cuda")
    saved = torch.load(state_path(parent.out / "epoch_002.safetensors"), weights_only=True)
    assert "rng_cuda" in saved
    child = run(recipe(), seed=3, out=tmp_path / "child", device="cuda",
                spawn_from=parent.out / "epoch_002.safetensors")
    assert same(child.final, parent.final)
