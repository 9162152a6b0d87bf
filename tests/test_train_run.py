"""Training runs: every recipe on tiny data, determinism, resume after a kill, metadata,
interventions and augmentations."""

from __future__ import annotations

import json
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptscope.adapters import get_adapter
from ckptscope.checkpoints import load_checkpoint, save_checkpoint
from ckptscope.errors import CkptscopeError
from ckptscope.linear import linear_path
from ckptscope.results import save_result
from ckptscope.train import load_recipe, override, recipe_names, run
from ckptscope.train.augment import random_brightness, random_crop, random_flip
from ckptscope.train.interventions import load_into, path_point
from ckptscope.train.loop import make_optimizer
from ckptscope.train.run import read_metrics
from tests.conftest import spiral_recipe

TINY = {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "eval_batch_size": 64,
        "random_labels_epochs": 1}
TINY_IMAGES = "tests.test_train_run:tiny_images"
DEEP = ("resnet34", "resnet50")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_images():
    """8x8 RGB images (16 train, 8 test): a ResNet step costs 1/16 of CIFAR's."""
    g = torch.Generator().manual_seed(0)
    return {"train": (torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,),
                                                                          generator=g)),
            "test": (torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,),
                                                                         generator=g))}


# --- tiny data files -----------------------------------------------------------------------------
def write_cifar(root: Path, *, n: int = 4, cifar100: bool = False, seed: int = 0) -> Path:
    """The python version of CIFAR-10/100 with ``n`` images per file (protocol-2 pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    names = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + [
        "test_batch"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 (b"fine_labels" if cifar100 else b"labels"):
                     [int(v) for v in rng.integers(0, 100 if cifar100 else 10, size=n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def write_mnist(root: Path, *, n: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            head = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(
                f">{array.ndim}I", *array.shape)
            (root / f"{prefix}-{kind}-ubyte").write_bytes(head + array.tobytes())
    return root


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"cifar10": write_cifar(root / "c10"), "cifar100": write_cifar(root / "c100",
                                                                          cifar100=True),
            "mnist": write_mnist(root / "mnist"), "root": root}


@pytest.fixture(scope="module")
def resnet18_result(data_dirs):
    """A result over two ResNet-18 states, for init at a point of a path."""
    root = data_dirs["root"]
    adapter = get_adapter("resnet18")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(save_checkpoint(root / f"r18_{seed}.safetensors",
                                     adapter.make({}).state_dict()))
    ds = linear_path(*paths, "resnet18", TINY_IMAGES, alphas=3)
    return save_result(ds, root / "r18.nc"), paths


def tiny_recipe(name: str, data_dirs, resnet18_result, tmp_path):
    """A recipe shrunk to one step on tiny data, with its needs met."""
    recipe = load_recipe(name)
    changes = dict(TINY)
    data_dir = None
    if recipe.data.startswith("spiral"):
        changes["data"] = "spiral:64,32"
    elif recipe.adapter.startswith("resnet"):
        changes["data"] = TINY_IMAGES  # the CIFAR files are read by the VGG recipes and below
        if recipe.adapter in DEEP:  # same keys and patterns, a fraction of the cost (see below)
            changes["adapter"] = "resnet18"
    elif recipe.data in data_dirs:
        data_dir = data_dirs[recipe.data]
    if "init_from" in recipe.needs:
        # Another head (an ImageNet model's 1000 classes): it keeps the fresh init.
        options = {**recipe.adapter_options, "num_classes": 7}
        torch.manual_seed(5)
        changes["init_from"] = str(save_checkpoint(
            tmp_path / "weights.safetensors",
            get_adapter(recipe.adapter).make(options).state_dict()))
    if "init_result" in recipe.needs:
        changes["init_result"] = str(resnet18_result[0])
    return override(recipe, changes), data_dir


@pytest.mark.parametrize("name", recipe_names())
def test_run_every_recipe_trains_a_step(name, data_dirs, resnet18_result, tmp_path):
    recipe, data_dir = tiny_recipe(name, data_dirs, resnet18_result, tmp_path)
    out = run(recipe, seed=0, out=tmp_path / "run", data_dir=data_dir)
    assert out.init.is_file() and out.final.is_file()
    assert not (tmp_path / "run" / "resume.pt").exists()
    [record] = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["epoch"] == 1 and 0 <= record["test_accuracy"] <= 1
    meta = load_checkpoint(out.final).metadata
    assert meta["recipe"] == name and meta["adapter"] == recipe.adapter
    assert json.loads(meta["config"])["epochs"] == 1
    init = json.loads(meta["init"])
    if recipe.init_from:
        assert "fc.weight" in init["init_fresh_keys"] or "layers.2.weight" in init[
            "init_fresh_keys"] or "classifier.weight" in init["init_fresh_keys"]
    if recipe.init_result:
        assert init["init_alpha"] in (0.0, 0.5, 1.0)
    if recipe.random_labels:
        assert init["random_labels"]["epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34-cifar10", "resnet50-cifar100-pretrained"])
def test_run_deep_resnet_recipes_train_a_step(name, data_dirs, resnet18_result, tmp_path):
    recipe, _ = tiny_recipe(name, data_dirs, resnet18_result, tmp_path)
    recipe = override(recipe, {"adapter": load_recipe(name).adapter})
    if recipe.init_from:  # weights of the deep net itself, with another head
        torch.manual_seed(5)
        options = {**recipe.adapter_options, "num_classes": 7}
        state = get_adapter(recipe.adapter).make(options).state_dict()
        path = save_checkpoint(tmp_path / "deep.safetensors", state)
        recipe = override(recipe, {"init_from": str(path)})
    out = run(recipe, seed=0, out=tmp_path / "run")
    assert load_checkpoint(out.final).metadata["adapter"] == recipe.adapter


def test_run_same_seed_gives_identical_final_with_augmentation(tmp_path):
    # An MLP on the images: the order, crop, flip and brightness streams are what is tested.
    recipe = override(load_recipe("resnet18-cifar10-brightness"), {
        **TINY, "steps_per_epoch": 2, "epochs": 2, "data": TINY_IMAGES, "adapter": "mlp",
        "adapter_options": {"widths": [192, 16, 10]}})
    finals = [run(recipe, seed=s, out=tmp_path / name).final
              for s, name in ((4, "a"), (4, "b"), (5, "c"))]
    a, b, c = (load_file(f) for f in finals)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_run_metadata_lets_linear_path_run_without_model_or_data(tmp_path):
    recipe = spiral_recipe(epochs=2)
    out = run(recipe, seed=1, out=tmp_path)
    ds = linear_path(out.init, out.final, alphas=5)
    assert ds.attrs["adapter"] == "mlp" and ds.attrs["data"] == "spiral:64,32"
    assert json.loads(ds.attrs["adapter_options"]) == {"widths": [2, 50, 50, 1]}
    meta = load_checkpoint(out.init).metadata
    assert (meta["seed"], meta["epoch"], meta["role"]) == ("1", "0", "init")
    assert json.loads(meta["versions"])["torch"] == torch.__version__


def test_run_reads_cifar_from_the_data_dir_and_records_the_spec(data_dirs, tmp_path):
    for name, key in (("resnet18-cifar10", "cifar10"), ("resnet50-cifar100", "cifar100")):
        recipe = override(load_recipe(name), {**TINY, "steps_per_epoch": 1})
        if key == "cifar100":  # the head only: the file path is what this checks
            recipe = override(recipe, {"adapter": "vgg11"})
        out = run(recipe, seed=0, out=tmp_path / name, data_dir=data_dirs[key])
        assert load_checkpoint(out.final).metadata["data"] == f"{key}:{data_dirs[key]}"
        assert out.last["test_accuracy"] in (0, 0.25, 0.5, 0.75, 1)


def test_run_refuses_a_directory_with_another_run(tmp_path):
    recipe = spiral_recipe(epochs=1)
    run(recipe, seed=0, out=tmp_path)
    with pytest.raises(CkptscopeError, match="holds a finished run; choose another --out"):
        run(recipe, seed=0, out=tmp_path)
    assert run(recipe, seed=0, out=tmp_path, resume=True).skipped
    (tmp_path / "final.safetensors").unlink()
    with pytest.raises(CkptscopeError, match="holds an unfinished run; continue it with --resume"):
        run(recipe, seed=0, out=tmp_path)


@pytest.mark.parametrize(("name", "changes", "match"), [
    ("resnet18-cifar10", {}, r"trains on cifar10: pass --data DIR"),
    ("resnet18-cifar10-pretrained", {}, r"needs init_from: pass --set init_from=\.\.\."),
    ("mlp-spiral-fig1a", {"augment": ["flip"]}, r"needs image data, and spiral is not"),
    ("mlp-spiral-fig1a", {"reset": ["nothing"]}, r"reset pattern 'nothing' matches no tensor"),
    ("mlp-spiral-fig1a", {"param_groups": [{"pattern": "x", "lr": 1.0}]},
     r"param_groups pattern 'x' matches no parameter"),
])
def test_run_bad_input_names_the_fix(name, changes, match, tmp_path):
    recipe = override(load_recipe(name), {"epochs": 1, **changes})
    with pytest.raises(CkptscopeError, match=match):
        run(recipe, seed=0, out=tmp_path / "run")


KILLABLE = {"epochs": 6, "batch_size": 100, "data": "spiral:12000,200", "eval_train": False,
            "adapter_options": {"widths": [2, 32, 32, 1]}}
_SCRIPT = f"""
import sys, torch
torch.set_num_threads(1)
from ckptscope.train import load_recipe, override, run
recipe = override(load_recipe("mlp-spiral-fig1a"), {KILLABLE!r})
run(recipe, seed=3, out=sys.argv[1], save_every=1, resume=sys.argv[2] == "resume")
"""


def test_run_resumed_after_kill_ends_with_the_same_final(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(killed), "fresh"])
    deadline = time.monotonic() + 120
    while not (killed / "epoch_002.safetensors").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.safetensors").exists()
    logged = [r["epoch"] for r in read_metrics(killed / "metrics.jsonl")]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) < 6
    subprocess.run([sys.executable, "-c", _SCRIPT, str(killed), "resume"], check=True)
    # The uninterrupted reference, in this process (one thread, as the script).
    run(override(load_recipe("mlp-spiral-fig1a"), KILLABLE), seed=3, out=whole, save_every=1)
    a, b = load_file(killed / "final.safetensors"), load_file(whole / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def untimed(folder):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
                for r in read_metrics(folder / "metrics.jsonl")]

    assert [r["epoch"] for r in untimed(killed)] == list(range(1, 7))
    assert untimed(killed) == untimed(whole)
    assert not (killed / "resume.pt").exists()


def test_read_metrics_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert read_metrics(path) == [{"epoch": 1}, {"epoch": 2}]


# --- interventions --------------------------------------------------------------------------------
def test_load_into_keeps_mismatched_and_skipped_keys_fresh(tmp_path):
    adapter = get_adapter("mlp")
    torch.manual_seed(0)
    fresh = adapter.make({"widths": [2, 8, 3]}).state_dict()
    torch.manual_seed(1)
    other = adapter.make({"widths": [2, 8, 5]}).state_dict()
    path = save_checkpoint(tmp_path / "w.safetensors", other)
    state, kept = load_into(fresh, str(path), skip=[r"layers\.0\.bias"])
    assert kept == ["layers.0.bias", "layers.1.bias", "layers.1.weight"]
    assert torch.equal(state["layers.0.weight"], other["layers.0.weight"])
    assert torch.equal(state["layers.1.weight"], fresh["layers.1.weight"])
    with pytest.raises(CkptscopeError, match="shares no tensor"):
        load_into(fresh, str(path), skip=["layers"])


def test_path_point_is_the_lerp_of_the_run_endpoints(tmp_path):
    adapter = get_adapter("mlp")
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(adapter.make({"widths": [2, 8, 1]}).state_dict())
    paths = [save_checkpoint(tmp_path / f"{i}.safetensors", s) for i, s in enumerate(states)]
    ds = linear_path(*paths, "mlp", "spiral:64,32", alphas=5, run="r")
    result = save_result(ds, tmp_path / "r.nc")
    point, alpha, run_label = path_point(str(result), alpha=0.25)
    assert (alpha, run_label) == (0.25, "r")
    for k in states[0]:
        assert torch.equal(point[k], torch.lerp(states[0][k], states[1][k], 0.25))
    _, peak, _ = path_point(str(result))
    assert peak == float(ds["peak_alpha"].sel(run="r", group="all", split="test"))
    with pytest.raises(CkptscopeError, match=r"init_run 'x' is not a run of .*; runs: \['r'\]"):
        path_point(str(result), run="x")


def test_run_reset_and_random_label_blocks_compose(tmp_path):
    recipe = override(load_recipe("mlp-spiral-fig1a"), {
        "epochs": 1, "data": "spiral:64,32", "random_labels": True,
        "random_labels_blocks": [r"layers\.0\."], "random_labels_epochs": 3,
        "random_labels_lr": 0.05, "reset": [r"layers\.0\.bias"]})
    out = run(recipe, seed=2, out=tmp_path / "run")
    torch.manual_seed(2)
    fresh = get_adapter("mlp").make({"widths": [2, 50, 50, 1]}).state_dict()
    init = load_file(out.init)
    assert not torch.equal(init["layers.0.weight"], fresh["layers.0.weight"])  # random labels
    assert torch.equal(init["layers.0.bias"], fresh["layers.0.bias"])  # reset
    assert torch.equal(init["layers.1.weight"], fresh["layers.1.weight"])  # untouched
    assert out.notes["random_labels"]["epoch"] <= 3


def test_make_optimizer_gives_groups_their_lr_and_weight_decay():
    module = get_adapter("resnet18").make({})
    opt = make_optimizer(module, optimizer="sgd", lr=0.1, weight_decay=5e-4, param_groups=[
        {"pattern": r"layer[23]\.|layer4\.0\.", "lr": 0.01},
        {"pattern": r"fc\.", "weight_decay": 0.0}])
    (g1, g2, rest) = opt.param_groups
    assert (g1["lr"], g1["weight_decay"]) == (0.01, 5e-4)
    assert (g2["lr"], g2["weight_decay"]) == (0.1, 0.0)
    assert (rest["lr"], rest["weight_decay"]) == (0.1, 5e-4)
    named = dict(module.named_parameters())
    assert any(p is named["layer4.0.conv1.weight"] for p in g1["params"])
    assert all(p is not named["layer4.1.conv1.weight"] for p in g1["params"])


# --- augmentations --------------------------------------------------------------------------------
def test_random_crop_takes_windows_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    assert torch.equal(random_crop(x, padding=0, generator=g), x)
    out = random_crop(x, padding=2, generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_random_flip_and_brightness():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 4, 4)
    out = random_flip(x, generator=g)
    for i in range(len(x)):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pixels = torch.rand(16, 3, 4, 4)
    bright = random_brightness((pixels - 0.5) / 0.25, strength=0.05, generator=g, mean=mean,
                               std=std) * 0.25 + 0.5
    ratio = bright / pixels.clamp_min(1e-3)
    assert bright.min() >= -1e-6 and bright.max() <= 1 + 1e-6
    assert (ratio[pixels > 0.1] > 0.95 - 1e-4).all()


def _layout_runs(recipe, tmp_path, name, layouts):
    finals = {}
    for layout in layouts:
        out = run(recipe, seed=0, out=tmp_path / f"{name}-{layout}", channels_last=layout)
        finals[layout] = load_file(out.final)
    return finals


def test_run_default_layout_on_the_cpu_is_channels_last_for_a_conv_net(tmp_path):
    # batch 32 from 16 images: the step sees all 16, the layout rule sees the recipe's 32
    recipe = override(load_recipe("resnet18-cifar10"), {
        **TINY, "batch_size": 32, "data": TINY_IMAGES, "augment": []})
    finals = _layout_runs(recipe, tmp_path, "resnet", (None, True, False))
    assert all(torch.equal(finals[None][k], finals[True][k]) for k in finals[None])
    small = override(recipe, {"batch_size": 8})  # below the threshold: the default layout
    finals = _layout_runs(small, tmp_path, "resnet-small", (None, False))
    assert all(torch.equal(finals[None][k], finals[False][k]) for k in finals[None])


def test_run_a_model_that_cannot_run_channels_last_keeps_the_default_layout(tmp_path):
    recipe = override(load_recipe("resnet18-cifar10"), {
        **TINY, "batch_size": 32, "data": TINY_IMAGES,
        "adapter": "tests.conftest:ViewNet", "adapter_options": {"classes": 10},
        "augment": []})
    finals = _layout_runs(recipe, tmp_path, "view", (None, False))
    assert all(torch.equal(finals[None][k], finals[False][k]) for k in finals[None])
    with pytest.raises(CkptscopeError, match="channels_last=True was asked for.*view"):
        run(recipe, seed=0, out=tmp_path / "forced", channels_last=True)
    assert not list((tmp_path / "forced").glob("*"))  # nothing half-written


def test_run_resumed_keeps_the_layout_it_started_in(tmp_path):
    recipe = override(load_recipe("resnet18-cifar10"), {
        **TINY, "epochs": 2, "batch_size": 32, "data": TINY_IMAGES, "augment": []})

    def stop_after_first(record):
        if record.get("epoch") == 1:
            raise KeyboardInterrupt

    whole = {layout: load_file(run(recipe, seed=0, out=tmp_path / f"whole-{layout}",
                                   channels_last=layout).final) for layout in (None, False)}
    assert load_checkpoint(tmp_path / "whole-None" / "final.safetensors").metadata[
        "channels_last"] == "true"

    def resumed(name, first, then, *, forget=False):
        with pytest.raises(KeyboardInterrupt):
            run(recipe, seed=0, out=tmp_path / name, channels_last=first,
                on_epoch=stop_after_first)
        if forget:  # a resume file from before the layout was recorded
            state = torch.load(tmp_path / name / "resume.pt", weights_only=True)
            del state["channels_last"]
            torch.save(state, tmp_path / name / "resume.pt")
        return load_file(run(recipe, seed=0, out=tmp_path / name, channels_last=then,
                             resume=True).final)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(whole[None], whole[False])  # the layout shows in θ_f
    assert same(resumed("cl", None, None), whole[None])
    assert same(resumed("nchw", False, None), whole[False])  # not today's default
    assert same(resumed("old", False, None, forget=True), whole[False])  # the CPU's old default
    with pytest.raises(CkptscopeError, match="trained with channels_last=True"):
        resumed("clash", None, False)


def test_resume_refuses_a_finished_run_of_another_recipe(tmp_path):
    recipe = spiral_recipe(epochs=1)
    run(recipe, seed=0, out=tmp_path)
    assert run(recipe, seed=0, out=tmp_path, resume=True).skipped  # the same recipe: handed back
    other = override(recipe, {"lr": 0.5})
    with pytest.raises(CkptscopeError, match=r"finished with another recipe \(lr: 0\.0005 -> 0\.5\)"):
        run(other, seed=0, out=tmp_path, resume=True)
    with pytest.raises(CkptscopeError, match=r"another recipe \(seed: 0 -> 1\)"):
        run(recipe, seed=1, out=tmp_path, resume=True)


def test_sweep_refuses_a_folder_trained_with_another_lr(tmp_path):
    from ckptscope.cli import main

    small = ["--set", "epochs=1", "--set", "data=spiral:64,32"]
    args = ["sweep", "--recipe", "mlp-spiral-fig1a", "--seeds", "0", "--out", str(tmp_path),
            "--alphas", "3", "--device", "cpu", *small]
    assert main(args) == 0
    stamp = (tmp_path / "seed_0" / "final.safetensors").stat().st_mtime_ns
    assert main([*args, "--set", "lr=0.5"]) == 2
    assert (tmp_path / "seed_0" / "final.safetensors").stat().st_mtime_ns == stamp
