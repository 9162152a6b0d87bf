"""The ckptscope command as users meet it: exit codes, one-line errors, files written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ckptscope.checkpoints import save_checkpoint
from ckptscope.cli import main
from ckptscope.results import open_result
from tests.conftest import run_cli as run


@pytest.fixture
def ckpts(tmp_path, mlp_pair):
    _, a, b = mlp_pair
    meta = {
        "adapter": "mlp",
        "adapter_options": {"widths": [2, 16, 16, 1]},
        "data": "spiral:120,90",
    }
    return (
        save_checkpoint(tmp_path / "init.safetensors", a, metadata=meta),
        save_checkpoint(tmp_path / "final.safetensors", b, metadata=meta),
    )


def test_path_needs_no_flags_for_ckptscope_checkpoints(ckpts, tmp_path, capsys):
    out = tmp_path / "r.nc"
    code, stdout, err = run(
        [
            "path",
            str(ckpts[0]),
            str(ckpts[1]),
            "--group",
            "layers.0.*",
            "--preset",
            "layers",
            "--alphas",
            "5",
            "--out",
            str(out),
            "--plot",
            str(tmp_path / "f.png"),
        ],
        capsys,
    )
    assert code == 0, err
    ds = open_result(out)
    assert list(ds.group.values) == ["all", "layer1", "layer2", "layer3", "layers.0.*"]
    assert ds.sizes["alpha"] == 5
    assert "layers.0.*" in stdout and "L(max)" in stdout and "distance" in stdout
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_path_alpha_range_split_hold(ckpts, tmp_path, capsys):
    out = tmp_path / "r.nc"
    code, _, err = run(
        [
            "path",
            *map(str, ckpts),
            "--alpha-range=-0.5:1.5:9",
            "--split",
            "both",
            "--hold",
            "start",
            "--group",
            "head=layers\\.2\\.",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    ds = open_result(out)
    assert ds.alpha.values[0] == -0.5 and ds.alpha.values[-1] == 1.5
    assert list(ds.split.values) == ["test", "train"] and ds.attrs["hold"] == "start"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["path", "{a}", "{missing}"], "does not exist"),
        (["path", "{a}", "{b}", "--group", "nothing"], "matched no tensor"),
        (["path", "{a}", "{b}", "--adapter", "nope"], "unknown adapter 'nope'"),
        (["path", "{a}", "{b}", "--data", "nope"], "unknown dataset 'nope'"),
        (["path", "{a}", "{b}", "--alphas", "5", "--alpha-range", "0:1:3"], "not both"),
        (["path", "{a}", "{b}", "--out", "{tmp}/r.txt"], "should end in .nc"),
        (["path", "{a}", "{text}"], "neither a safetensors file"),
        (["path", "{a}", "{b}", "--preset", "blocks"], "no preset 'blocks'"),
        (["path", "{a}", "{b}", "--adapter-opt", "widths"], "KEY=VALUE"),
        (["inspect", "{a}", "{other}"], "do not match"),
    ],
)
def test_bad_input_one_line_exit_2_no_output(ckpts, tmp_path, capsys, argv, match):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    other = save_checkpoint(tmp_path / "other.safetensors", {"w": __import__("torch").zeros(2)})
    fmt = {
        "a": ckpts[0],
        "b": ckpts[1],
        "missing": tmp_path / "nope.pt",
        "text": text,
        "tmp": tmp_path,
        "other": other,
    }
    before = set(os.listdir(tmp_path))
    code, _, err = run(
        [x.format(**fmt) for x in argv] + ["--out", str(tmp_path / "o.nc")]
        if argv[0] == "path" and "--out" not in argv
        else [x.format(**fmt) for x in argv],
        capsys,
    )
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before


def test_inspect_lists_keys_groups_distance(ckpts, capsys):
    code, out, err = run(
        ["inspect", *map(str, ckpts), "--preset", "layers", "--group", "layers.1"], capsys
    )
    assert code == 0, err
    assert "layers.0.weight" in out and "(16, 2)" in out
    assert "layer1" in out and "distance" in out and "adapter=mlp" in out


def test_demo_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--out", str(out), "--epochs", "2"], capsys)
    assert code == 0, err
    for name in ("init.safetensors", "final.safetensors", "result.nc", "paths.png"):
        assert (out / name).is_file(), name
    ds = open_result(out / "result.nc")
    assert list(ds.group.values) == ["all", "layer1", "layer2", "layer3"]
    assert "test accuracy" in stdout and "layer3" in stdout


def test_module_entry_point_and_version():
    res = subprocess.run(
        [sys.executable, "-m", "ckptscope", "--version"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "0.1.0" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "ckptscope", "path", "x.pt", "y.pt"], capture_output=True, text=True
    )
    assert res.returncode == 2 and res.stderr.startswith("error: ")
    assert "Traceback" not in res.stderr


def test_the_program_tunes_the_allocator_and_main_does_not(monkeypatch, capsys):
    import ckptscope.allocator as allocator
    from ckptscope.cli import run

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    assert main(["list"]) == 0 and calls == []  # a library caller's process is left alone
    monkeypatch.setattr("sys.argv", ["ckptscope", "list"])
    assert run() == 0 and calls == [1]
    assert "mlp" in capsys.readouterr().out


def test_allocator_settings_give_way_to_the_user(monkeypatch):
    import platform

    from ckptscope.allocator import keep_freed_memory

    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CKPTSCOPE_MALLOC", "default")
    assert keep_freed_memory() is False
    monkeypatch.delenv("CKPTSCOPE_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True


def tiny_images():
    """37 random 3x8x8 images in 3 classes: one batch of 37 takes the channels-last default."""
    import torch

    g = torch.Generator().manual_seed(5)
    return {"test": (torch.randn(37, 3, 8, 8, generator=g), torch.randint(0, 3, (37,),
                                                                         generator=g))}


def test_path_channels_last_flags(tmp_path, capsys):
    import numpy as np

    from tests.conftest import ViewNet, perturbed  # flattens with .view: fails channels-last

    a = ViewNet().state_dict()
    pair = [str(save_checkpoint(tmp_path / f"{n}.safetensors", s))
            for n, s in (("a", a), ("b", perturbed(a, 0.3, 3)))]
    # User code is named on the command line: a file's metadata never imports it.
    pair += ["--adapter", "tests.conftest:ViewNet", "--data", "tests.test_cli:tiny_images"]
    curves = []
    for flags in ([], ["--no-channels-last"]):
        out = tmp_path / f"r{len(flags)}.nc"
        code, _, err = run(["path", *pair, "--alphas", "3", "--out", str(out), *flags], capsys)
        assert code == 0, err
        curves.append(open_result(out)["loss"].values)
    np.testing.assert_array_equal(curves[0], curves[1])  # the default fell back to the layout
    code, _, err = run(["path", *pair, "--alphas", "3", "--channels-last",
                        "--out", str(tmp_path / "forced.nc")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--no-channels-last" in err, err
    assert not (tmp_path / "forced.nc").exists()
