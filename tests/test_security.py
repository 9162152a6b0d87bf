"""Trust: hostile files, broken inputs, interruptions — nothing run, nothing lost."""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckptscope.checkpoints import load_checkpoint, save_checkpoint
from ckptscope.cli import main
from ckptscope.errors import CkptscopeError
from ckptscope.results import open_result


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def safetensors_bytes(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.fixture
def good(tmp_path, mlp_pair):
    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 16, 16, 1]}, "data": "spiral:60,50"}
    return (
        save_checkpoint(tmp_path / "a.safetensors", a, metadata=meta),
        save_checkpoint(tmp_path / "b.safetensors", b, metadata=meta),
    )


def hostile(tmp_path, case: str):
    """Write one hostile or broken file; return (path, marker a payload would create)."""
    marker = tmp_path / f"pwned-{case}"
    path = tmp_path / f"{case}.pt"
    state = {"w": torch.zeros(3)}
    if case == "reduce-torch":
        torch.save({"state_dict": state, "x": Payload(marker)}, path)
    elif case == "reduce-pickle":
        path.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))
    elif case == "truncated":
        save_file(state, str(path))
        path.write_bytes(path.read_bytes()[:-4])
    elif case == "absurd-size":
        header = {"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}
        path.write_bytes(safetensors_bytes(header, b"\0" * 16))
    elif case == "bad-offsets":
        header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}
        path.write_bytes(safetensors_bytes(header, b"\0" * 16))
    elif case == "unknown-dtype":
        header = {"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}
        path.write_bytes(safetensors_bytes(header, b"\0" * 16))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("model weights: see attached\n")
    elif case == "zip":
        import zipfile

        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data.txt", "not torch")
    elif case == "directory":
        path.mkdir()
    elif case == "dangling":
        path.symlink_to(tmp_path / "gone")
    return path, marker


CASES = [
    "reduce-torch",
    "reduce-pickle",
    "truncated",
    "absurd-size",
    "bad-offsets",
    "unknown-dtype",
    "empty",
    "text",
    "zip",
    "directory",
    "dangling",
]


@pytest.mark.parametrize("case", CASES)
def test_hostile_file_one_line_exit_2_nothing_run_nothing_written(tmp_path, good, capsys, case):
    path, marker = hostile(tmp_path, case)
    out = tmp_path / "r.nc"
    code = main(["path", str(good[0]), str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not marker.exists()
    assert not out.exists() and not (tmp_path / "r.nc.partial").exists()


@pytest.mark.parametrize("case", ["reduce-torch", "reduce-pickle"])
def test_payload_runs_under_plain_pickle(tmp_path, case):
    """The payloads above are real: a plain unpickle would have run them."""
    path, marker = hostile(tmp_path, case)
    if case == "reduce-torch":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_checkpoint_errors(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        load_checkpoint(path)
    except CkptscopeError as err:
        assert "\n" not in str(err)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8), st.booleans())
def test_fuzz_mutated_safetensors_only_checkpoint_errors(tmp_path, at, patch, cut):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6.0), "n": torch.tensor([3])}, str(path))
    raw = bytearray(path.read_bytes())
    at %= len(raw)
    raw[at : at + len(patch)] = patch
    path.write_bytes(bytes(raw[:at]) if cut else bytes(raw))
    try:
        ckpt = load_checkpoint(path)
    except CkptscopeError:
        return
    # A mutation can leave a valid file (a renamed key, a changed value): it loads as tensors.
    assert len(ckpt.state) <= 2
    assert all(isinstance(v, torch.Tensor) for v in ckpt.state.values())


def test_tied_weights_count_once_in_distance(tmp_path, capsys):
    shared = torch.ones(4)
    a = {"emb.weight": shared, "head.weight": shared, "b": torch.ones(2)}
    b = {"emb.weight": shared * 3, "head.weight": shared * 3, "b": torch.ones(2)}
    b["head.weight"] = b["emb.weight"]
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    code = main(["distance", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    out = capsys.readouterr().out
    assert code == 0
    # ||b - a|| / ||a|| with emb counted once: sqrt(4 * 4) / sqrt(4 + 2) = 4 / sqrt(6)
    assert f"{4 / np.sqrt(6):.4g}" in out


def test_dtype_mismatch_upcast_with_a_note(tmp_path, good):
    half = {k: v.half() for k, v in load_checkpoint(good[1]).state.items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    ckpt = load_checkpoint(path)
    assert ckpt.notes and "upcast" in ckpt.notes[0]


def test_nan_weights_give_invalid_verdict_and_failing_check(tmp_path, good, capsys):
    state = load_checkpoint(good[1]).state
    state["layers.0.weight"][0, 0] = float("nan")
    bad = save_checkpoint(
        tmp_path / "nan.safetensors", state, metadata=load_checkpoint(good[1]).metadata
    )
    out = tmp_path / "r.nc"
    code = main(["path", str(good[0]), str(bad), "--alphas", "5", "--out", str(out)])
    assert code == 0
    assert "NaN/Inf" in capsys.readouterr().err
    ds = open_result(out)
    assert ds["shape"].sel(group="all").item() == "invalid"
    code = main(["check", str(out), "--expect", "all:shape=monotonic"])
    captured = capsys.readouterr()
    assert code == 1 and "invalid" in captured.out


def test_edited_result_is_refused(tmp_path, good, capsys):
    out = tmp_path / "r.nc"
    assert main(["path", *map(str, good), "--alphas", "3", "--out", str(out)]) == 0
    ds = open_result(out).drop_vars("accuracy")
    ds.to_netcdf(tmp_path / "edited.nc", engine="scipy")
    code = main(["check", str(tmp_path / "edited.nc"), "--expect", "all:shape=monotonic"])
    err = capsys.readouterr().err
    assert code == 2 and "variable 'accuracy' is missing" in err


def slow_cli(tmp_path, good, out):
    """A `ckptscope path` run that takes a few seconds: many groups, many alphas."""
    groups = [f"--group=g{i}=layers\\.{i % 3}\\." for i in range(8)]
    return [
        sys.executable,
        "-m",
        "ckptscope",
        "path",
        str(good[0]),
        str(good[1]),
        "--data",
        "spiral:200,3000",
        "--alphas",
        "201",
        *groups,
        "--out",
        str(out),
    ]


def test_killed_run_leaves_no_result_and_rerun_resumes(tmp_path, good):
    out = tmp_path / "r.nc"
    partial = tmp_path / "r.nc.partial"
    proc = subprocess.Popen(slow_cli(tmp_path, good, out), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(partial.glob("*.safetensors"))) < 2:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done_before = len(list(partial.glob("*.safetensors")))
    assert done_before >= 2
    res = subprocess.run(slow_cli(tmp_path, good, out), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed" in res.stderr
    assert not partial.exists()
    resumed = open_result(out)
    fresh_out = tmp_path / "fresh.nc"
    res = subprocess.run(slow_cli(tmp_path, good, fresh_out), capture_output=True, text=True)
    assert res.returncode == 0
    np.testing.assert_array_equal(resumed.loss.values, open_result(fresh_out).loss.values)


def test_two_commands_writing_one_output(tmp_path, good):
    out = tmp_path / "r.nc"
    cmd = [
        sys.executable,
        "-m",
        "ckptscope",
        "path",
        *map(str, good),
        "--alphas",
        "41",
        "--group",
        "layers.0",
        "--out",
        str(out),
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)
    ]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    ds = open_result(out)
    assert ds.sizes["alpha"] == 41
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_repeated_group_in_one_call_is_not_reported_as_resumed(tmp_path, good, capsys):
    out = tmp_path / "r.nc"
    code = main(["path", *map(str, good), "--alphas", "3", "--group", "same=.*", "--out",
                 str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "resumed" not in err
    assert "resumed" not in open_result(out).attrs["notes"]


class _TrainerHparams(dict):
    """A stand-in for Lightning's AttributeDict: a class only a full unpickle builds."""


def test_refused_class_is_named_without_terminal_escapes(tmp_path, good, capsys):
    """torch's first line is advice wrapped in ANSI bold codes; the one-line error carried them
    to the terminal and left out which class the file needed."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": _TrainerHparams(lr=1)},
               path)
    code = main(["path", str(good[0]), str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "\x1b" not in err
    assert "Unsupported global: GLOBAL tests.test_security._TrainerHparams" in err
