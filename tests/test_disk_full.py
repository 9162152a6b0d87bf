"""A full disk: one line naming the file, exit 2, nothing half-written (issue #12, section 4)."""

from __future__ import annotations

import errno
import os

import pytest
import xarray as xr

from ckptscope.cli import main


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as the kernel gives it: no name


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_path_out_on_a_full_disk_names_the_file(tmp_path, capsys, monkeypatch, demo_pair):
    monkeypatch.setattr(xr.Dataset, "to_netcdf", _full_disk)
    out = tmp_path / "r.nc"
    code = main(["path", *map(str, demo_pair), "--alphas", "3", "--out", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"error: cannot write {str(out)!r}: No space left on device; free")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".r.nc")]


def test_demo_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    code = main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"])
    line = _one_line(capsys.readouterr().err.split("\n", 1)[-1])  # after the "training" line
    assert code == 2
    assert "cannot write" in line and "init.safetensors" in line and "free space" in line
    assert not list((tmp_path / "demo").glob("*.safetensors"))


def test_an_os_error_without_a_file_name_has_no_empty_brackets(capsys, monkeypatch):
    import ckptscope.cli as cli

    def boom(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli.cli, "main", boom)
    assert main(["list"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "()" not in line and line.startswith("error: Input/output error;")


@pytest.fixture
def demo_pair(tmp_path):
    import torch

    from ckptscope.adapters.mlp import MLP
    from ckptscope.checkpoints import save_checkpoint

    torch.manual_seed(0)
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 8, 1]}, "data": "spiral:64,32"}
    paths = []
    for name in ("a", "b"):
        paths.append(save_checkpoint(tmp_path / f"{name}.safetensors",
                                     MLP([2, 8, 1]).state_dict(), metadata=meta))
    return paths
