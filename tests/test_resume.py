"""Resume: finished chunks reused bitwise, forged or broken chunk files never trusted, resume keys
that tell models and losses apart, stale temporaries and the umask."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from torch import nn

import ckptscope
import ckptscope.cache as cache
from ckptscope.checkpoints import save_checkpoint
from ckptscope.cli import main
from ckptscope.data import load_data
from ckptscope.engine import EvalConfig
from ckptscope.files import _HOST, current_umask, replacing, write_text
from ckptscope.identity import curve_fingerprint
from ckptscope.linear import linear_paths
from ckptscope.losses import binary_cross_entropy as bce
from ckptscope.results import open_result

KW = dict(data="spiral:200,300", alphas=17, groups=["layers.0", "layers.2"])


@pytest.fixture
def good(tmp_path, mlp_pair):
    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 16, 16, 1]}, "data": "spiral:60,50"}
    return (
        str(save_checkpoint(tmp_path / "a.safetensors", a, metadata=meta)),
        str(save_checkpoint(tmp_path / "b.safetensors", b, metadata=meta)),
    )


def chunk_files(folder) -> list:
    return sorted(folder.glob("*.safetensors"))


def full_chunk(folder):
    """A chunk file of 8 points (the last chunk of a grid may hold fewer)."""
    return max(chunk_files(folder), key=lambda p: p.stat().st_size)


def same(x, y) -> bool:
    """Bitwise equal curves (NaN where NaN)."""
    return all(np.array_equal(x[v].values, y[v].values, equal_nan=True)
               for v in ("loss", "accuracy"))


# --- chunks reused bitwise -------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_resumed_chunks_give_the_uninterrupted_curves_bitwise(tmp_path, good, strategy):
    fresh = ckptscope.linear_path(*good, config=EvalConfig(strategy=strategy), **KW)
    partial = tmp_path / "partial"
    ckptscope.linear_path(*good, config=EvalConfig(strategy=strategy), resume_dir=partial, **KW)
    files = chunk_files(partial)
    # 17 alphas: the whole model in chunks of 8 (3 files), each group in at most 4 (3 files).
    assert len(files) == 9
    for path in files[::2]:  # as if killed: every other chunk is missing
        path.unlink()
    resumed = ckptscope.linear_path(*good, config=EvalConfig(strategy=strategy), resume_dir=partial, **KW)
    reused = int(resumed.attrs["notes"].split("resumed ")[1].split(" ")[0])
    assert 0 < reused < 51
    assert f"resumed {reused} of 51 points from {partial}/" in resumed.attrs["notes"]
    assert same(resumed, fresh)
    assert len(chunk_files(partial)) == 9  # the missing chunks were stored again


def test_killed_whole_model_path_resumes_bitwise(tmp_path, good):
    """A whole-model-only path killed after its first chunk: the rerun evaluates the rest."""
    def cli(out):
        return [sys.executable, "-m", "ckptscope", "path", *good, "--data", "spiral:200,2000",
                "--alphas", "201", "--out", str(out)]

    out, partial = tmp_path / "r.nc", tmp_path / "r.nc.partial"
    proc = subprocess.Popen(cli(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not chunk_files(partial):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and chunk_files(partial)
    res = subprocess.run(cli(out), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stderr.splitlines() if x.startswith("resumed "))
    reused = int(line.split()[1])
    assert 0 < reused < 201 and line == f"resumed {reused} of 201 points from {partial}/"
    assert not partial.exists()  # removed with the killed writer's temporaries
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    fresh = tmp_path / "fresh.nc"
    assert subprocess.run(cli(fresh), capture_output=True).returncode == 0
    resumed = open_result(out)
    assert line in resumed.attrs["notes"]
    assert same(resumed, open_result(fresh))


def test_several_runs_keep_each_runs_resume_note(tmp_path, good):
    pairs = {"x": good, "y": good[::-1]}
    kw = dict(data="spiral:200,300", alphas=9, resume_dir=tmp_path / "p")
    linear_paths(pairs, **kw)
    again = linear_paths(pairs, **kw)
    assert "run x: resumed 9 of 9 points" in again.attrs["notes"]
    assert "run y: resumed 9 of 9 points" in again.attrs["notes"]


# --- chunk files that are not used -----------------------------------------------------------
def read_chunk(path) -> tuple[dict, dict]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.pop("__metadata__")
    arrays = {
        name: np.frombuffer(data[8 + size + e["data_offsets"][0] : 8 + size + e["data_offsets"][1]],
                            dtype={"F64": "<f8", "I64": "<i8"}[e["dtype"]]).reshape(e["shape"])
        for name, e in header.items()
    }
    return meta, arrays


def raw_safetensors(tensors: dict[str, tuple[str, list, bytes]], metadata: dict) -> bytes:
    """A safetensors file by hand: any dtype string, any bytes."""
    header, body = {"__metadata__": metadata}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body),
                                                                         len(body) + len(raw)]}
        body += raw
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def forge(path, *, digest: str = "recompute", key: str | None = None, **values) -> None:
    """Rewrite a chunk file with other values; its digest recomputed, or left stale."""
    meta, arrays = read_chunk(path)
    arrays = {k: np.array(v) for k, v in arrays.items()}
    for name, value in values.items():
        arrays[name][...] = value
    key = key or meta["key"]
    data = cache.encode_chunk(key, arrays["loss"], arrays["accuracy"], arrays["alpha"],
                              arrays["alpha_index"])
    if digest == "stale":
        data = data.replace(cache.chunk_digest(key, arrays).encode(), meta["digest"].encode())
    path.write_bytes(data)


def resumed_after(tmp_path, good, damage, **kw):
    """Store every chunk, damage the first whole-model chunk file, resume; return
    (result, warnings, the damaged path, the uninterrupted result)."""
    kw = {**KW, "groups": None, **kw}
    partial = tmp_path / "partial"
    fresh = ckptscope.linear_path(*good, resume_dir=partial, **kw)
    target = full_chunk(partial)
    damage(target)
    with pytest.warns(UserWarning) as caught:
        ds = ckptscope.linear_path(*good, resume_dir=partial, **kw)
    return ds, [str(w.message) for w in caught if str(partial) in str(w.message)], target, fresh


def test_forged_loss_with_a_stale_digest_is_recomputed(tmp_path, good):
    ds, warned, target, fresh = resumed_after(
        tmp_path, good, lambda p: forge(p, loss=42.0, digest="stale"))
    assert same(ds, fresh) and (ds.loss.values != 42).all()
    assert "resumed 9 of 17 points" in ds.attrs["notes"]  # the 8 forged ones recomputed
    assert any("failed verification" in w and "digest" in w for w in warned)
    assert "failed verification" in ds.attrs["notes"]
    assert read_chunk(target)[1]["loss"].max() != 42  # replaced by the recomputed chunk


def test_forged_loss_with_a_matching_digest_but_another_key_is_recomputed(tmp_path, good):
    ds, warned, _, fresh = resumed_after(
        tmp_path, good, lambda p: forge(p, loss=42.0, key="0" * 64))
    assert same(ds, fresh)
    assert any("key mismatch" in w for w in warned)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"accuracy": 1.5}, "accuracy outside [0, 1]"),
        ({"accuracy": np.nan}, "whole number of examples"),  # a built-in loss counts examples
        ({"accuracy": 0.123456789}, "whole number of examples"),
        ({"loss": -1.0}, "negative loss"),
        ({"loss": -np.inf}, "negative loss"),
        ({"alpha": 0.5}, "other alphas"),
        ({"alpha_index": 3}, "other alphas"),
    ],
)
def test_impossible_values_with_a_matching_key_and_digest_are_recomputed(tmp_path, good, values,
                                                                          reason):
    ds, warned, _, fresh = resumed_after(tmp_path, good, lambda p: forge(p, **values))
    assert same(ds, fresh)
    assert any(reason in w for w in warned), warned


def test_nan_loss_is_a_value(tmp_path, good):
    """NaN weights give NaN curves: a chunk holding NaN loss is reused."""
    partial = tmp_path / "partial"
    kw = {**KW, "groups": None}
    ckptscope.linear_path(*good, resume_dir=partial, **kw)
    forge(full_chunk(partial), loss=np.nan)
    ds = ckptscope.linear_path(*good, resume_dir=partial, **kw)
    assert "resumed 17 of 17" in ds.attrs["notes"]
    assert np.isnan(ds.loss.values).sum() == 8


def retyped(dtype: str, raw: bytes | None = None):
    """Damage: the loss stored as another dtype (complex, int, strings), key and digest kept."""
    def damage(path):
        meta, arrays = read_chunk(path)
        shape = list(arrays["loss"].shape)
        tensors = {k: ({"alpha_index": "I64"}.get(k, "F64"), list(v.shape), v.tobytes())
                   for k, v in arrays.items()}
        n = int(np.prod(shape))
        body = raw if raw is not None else (
            np.full(n, 42, {"C128": "<c16", "I64": "<i8", "F32": "<f4"}[dtype]).tobytes())
        tensors["loss"] = (dtype, shape, body)
        path.write_bytes(raw_safetensors(tensors, meta))
    return damage


def damaged_bytes(how: str):
    def damage(path):
        data = path.read_bytes()
        if how == "garbage":
            path.write_bytes(os.urandom(len(data)))
        elif how == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "text":
            path.write_text("loss = 42\n")
        elif how == "deep-json":
            text = b"[" * 5000
            path.write_bytes(struct.pack("<Q", len(text)) + text)
        elif how == "size-bomb":  # 8 GiB, sparse: read whole, it would take 8 GiB of memory
            with open(path, "r+b") as f:
                f.truncate(8 << 30)
        elif how == "symlink":
            real = path.with_name("elsewhere")
            path.rename(real)
            path.symlink_to(real)
        elif how == "fifo":  # opening it for reading would block
            path.unlink()
            os.mkfifo(path)
        elif how == "directory":
            path.unlink()
            path.mkdir()
    return damage


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (retyped("C128"), "loss is not F64"),
        (retyped("I64"), "loss is not F64"),
        (retyped("F32"), "loss is not F64"),
        (retyped("U8", b"loss=42!" * 34), "loss is not F64"),  # a string's bytes
        (damaged_bytes("garbage"), ""),
        (damaged_bytes("truncated"), ""),
        (damaged_bytes("empty"), "shorter than a header"),
        (damaged_bytes("text"), "does not fit"),
        (damaged_bytes("deep-json"), "not JSON"),
        (damaged_bytes("size-bomb"), "more than the"),
        (damaged_bytes("symlink"), "cannot be opened"),
        (damaged_bytes("fifo"), "not a regular file"),
        (damaged_bytes("directory"), ""),
    ],
    ids=["complex", "int", "float32", "string", "garbage", "truncated", "empty", "text",
         "deep-json", "size-bomb", "symlink", "fifo", "directory"],
)
def test_broken_chunk_files_are_recomputed_never_a_crash(tmp_path, good, damage, reason,
                                                         monkeypatch):
    read = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
    ds, warned, _, fresh = resumed_after(tmp_path, good, damage)
    assert same(ds, fresh)
    assert "resumed 9 of 17 points" in ds.attrs["notes"]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "failed verification" in warned[0] and reason in warned[0], warned
    assert max(read, default=0) < 1 << 20  # nothing read in bulk (the size bomb)


def test_the_earlier_format_is_deleted_unread(tmp_path, good, monkeypatch):
    """A deflate bomb in the earlier format's name: deleted without a byte decompressed."""
    import zipfile

    partial = tmp_path / "partial"
    partial.mkdir()
    bomb = partial / ("0" * 32 + ".npz")
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("loss.npy", b"\0" * (64 << 20))  # 64 MiB in 64 KiB

    class Read(BaseException):  # not an Exception: no handler swallows it
        pass

    def refuse(*args, **kwargs):
        raise Read("opened the earlier format's file")

    real_zipfile = zipfile.ZipFile

    def zip_writer_only(file, mode="r", *args, **kwargs):
        if mode == "r":
            refuse()
        return real_zipfile(file, mode, *args, **kwargs)

    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(zipfile, "ZipFile", zip_writer_only)
    with pytest.warns(UserWarning, match=r"1 file.s. of an earlier format \(unread\)"):
        ds = ckptscope.linear_path(*good, resume_dir=partial, **KW)
    assert not bomb.exists()
    assert "earlier format" in ds.attrs["notes"]


def test_cli_rerun_says_how_many_points_it_reused(tmp_path, good, capsys):
    out = tmp_path / "r.nc"
    partial = tmp_path / "r.nc.partial"
    args = ["path", *good, "--alphas", "9", "--data", "spiral:200,300", "--out", str(out)]
    ckptscope.linear_path(*good, alphas=9, data="spiral:200,300", resume_dir=partial)
    full_chunk(partial).unlink()  # 8 of the 9 points
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"resumed 1 of 9 points from {partial}/" in err.splitlines()
    assert not partial.exists()


# --- keys that tell models and losses apart --------------------------------------------------
NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.{act}(self.fc(x)))
"""


def net_class(act: str) -> type:
    """``Net`` of a module ``user_models`` without source on disk: two of these differ only in
    their activation (same module, qualname and repr)."""
    module = types.ModuleType("user_models")
    exec(compile(NET.format(act=act), "<user_models>", "exec"), module.__dict__)
    return module.Net


def test_models_with_one_name_and_repr_but_another_activation_do_not_share_a_key(tmp_path):
    tanh, relu = net_class("tanh")(), net_class("relu")()
    assert type(tanh).__qualname__ == type(relu).__qualname__ and repr(tanh) == repr(relu)
    a = {k: v.clone() for k, v in tanh.state_dict().items()}
    b = {k: v + 0.3 for k, v in a.items()}
    data = load_data("spiral:100,200", seed=0)
    kw = dict(data=data, alphas=5, loss="bce")
    ckptscope.linear_path(a, b, tanh, resume_dir=tmp_path / "p", **kw)
    reused = ckptscope.linear_path(a, b, relu, resume_dir=tmp_path / "p", **kw)
    assert "resumed" not in reused.attrs["notes"]
    assert same(reused, ckptscope.linear_path(a, b, relu, **kw))
    again = ckptscope.linear_path(a, b, net_class("relu")(), resume_dir=tmp_path / "p", **kw)
    assert "resumed 5 of 5" in again.attrs["notes"]  # the same code is the same model


class Scaled(nn.Module):
    def __init__(self, scale: float, act=torch.tanh):
        super().__init__()
        self.fc, self.scale, self.act = nn.Linear(2, 1), scale, act

    def forward(self, x):
        return self.act(self.fc(x)) * self.scale


def key_of(module=None, loss="bce", **settings) -> str:
    module = module or Scaled(2.0)
    state = {k: torch.zeros_like(v) for k, v in module.state_dict().items()}
    found = curve_fingerprint(module=module, loss=loss, anchors=(state, state),
                              data={"test": (torch.zeros(3, 2), torch.zeros(3))}, bn_data=None,
                              settings=settings, device=torch.device("cpu"))
    assert found.unknown == ()
    return found.key


def scaled_loss(scale):
    return lambda out, y: (bce(out, y)[0] * scale, bce(out, y)[1])


def test_fingerprint_tells_apart_what_the_curves_depend_on():
    base = key_of()
    torch.manual_seed(1)
    assert key_of(Scaled(2.0)) == base  # the module's own weights do not count
    assert key_of(Scaled(3.0)) != base  # an attribute
    assert key_of(Scaled(2.0, act=torch.relu)) != base  # a callable attribute
    assert key_of(loss="cross_entropy") != base
    assert key_of(batch=4) != key_of(batch=8)
    assert key_of(loss=scaled_loss(1.0)) != key_of(loss=scaled_loss(2.0))  # closures
    assert key_of(loss=scaled_loss(2.0)) == key_of(loss=scaled_loss(2.0))


def test_two_lambda_losses_do_not_share_a_key(tmp_path, good):
    first = lambda out, y: bce(out, y)  # noqa: E731
    second = lambda out, y: (bce(out, y)[0] * 2, bce(out, y)[1])  # noqa: E731
    assert first.__qualname__ == second.__qualname__
    kw = dict(data="spiral:200,300", alphas=5, resume_dir=tmp_path / "p")
    ckptscope.linear_path(*good, loss=first, **kw)
    ds = ckptscope.linear_path(*good, loss=second, **kw)
    assert "resumed" not in ds.attrs["notes"]
    assert same(ds, ckptscope.linear_path(*good, loss=second, data="spiral:200,300", alphas=5))


class Handle:
    """An object with no ``__dict__`` whose ``repr`` is only its address."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class Opaque(nn.Module):
    """The MLP's layers, and an attribute that has no value to compare."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 16), nn.Linear(16, 16), nn.Linear(16, 1)])
        self.handle = Handle(3)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def test_a_model_that_cannot_be_fingerprinted_is_not_resumed(tmp_path, good):
    partial = tmp_path / "p"
    kw = dict(data="spiral:200,300", alphas=5, loss="bce", resume_dir=partial)
    with pytest.warns(UserWarning, match=r"resume is off: .*model attribute Opaque\['handle'\]"):
        ds = ckptscope.linear_path(*good, Opaque(), **kw)
    assert "resume is off" in ds.attrs["notes"]
    assert not partial.exists()


# --- temporaries and modes -------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_rerun_removes_killed_writers_temporaries_but_not_live_ones(tmp_path, good):
    out = tmp_path / "r.nc"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = tmp_path / f".r.nc.{dead_pid()}-{_HOST}.{'ab' * 8}.tmp"
        working = tmp_path / f".r.nc.{live.pid}-{_HOST}.{'cd' * 8}.tmp"
        elsewhere = tmp_path / f".r.nc.{dead_pid()}-{'0' * 8}.{'ef' * 8}.tmp"  # another host
        other = tmp_path / f".s.nc.{dead_pid()}-{_HOST}.{'ab' * 8}.tmp"  # another target
        for path in (stale, working, elsewhere, other):
            path.write_bytes(b"half a file")
        assert main(["path", *good, "--alphas", "3", "--out", str(out)]) == 0
        assert not stale.exists()
        assert working.exists() and elsewhere.exists() and other.exists()
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, good, umask, mode):
    before = os.umask(umask)
    try:
        assert current_umask() == umask
        out, text = tmp_path / "r.nc", tmp_path / "notes.txt"
        assert main(["path", *good, "--alphas", "3", "--out", str(out)]) == 0
        write_text(text, "x")
        with replacing(tmp_path / "made.bin") as tmp:  # a writer that makes its own file
            tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
    finally:
        os.umask(before)
    for path in (out, text, tmp_path / "made.bin"):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path


def test_a_folder_that_refuses_new_files_is_named_not_retried(tmp_path, monkeypatch):
    """A folder that exists but where no file can be created (/proc) said 'no free temporary
    name' after 100 tries; it is the file system's own error, after one retry."""
    from ckptscope.errors import CkptscopeError

    calls = []

    def refuse(path, *args, **kwargs):
        calls.append(path)
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr("ckptscope.files.os.open", refuse)
    with pytest.raises(CkptscopeError, match=r"cannot write .*x\.png': No such file or directory"):
        with replacing(tmp_path / "x.png"):
            pass
    assert len(calls) == 2
