"""Sharding over torch.distributed ranks: two gloo processes give the single-process result."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ckptscope.checkpoints import save_checkpoint
from ckptscope.distributed import owned
from ckptscope.results import open_result


@pytest.mark.parametrize("groups, alphas, size", [(1, 51, 2), (5, 7, 3), (2, 1, 4)])
def test_owned_partitions_the_grid(groups, alphas, size):
    masks = [owned(groups, alphas, r, size) for r in range(size)]
    assert np.array_equal(sum(m.astype(int) for m in masks), np.ones((groups, alphas), int))


def test_two_gloo_ranks_equal_one_process(tmp_path, mlp_pair):
    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 16, 16, 1]},
            "data": "spiral:100,300"}
    pa = save_checkpoint(tmp_path / "a.safetensors", a, metadata=meta)
    pb = save_checkpoint(tmp_path / "b.safetensors", b, metadata=meta)
    args = ["path", str(pa), str(pb), "--preset", "layers", "--alphas", "9", "--split", "both"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    single = subprocess.run([sys.executable, "-m", "ckptscope", *args, "--out",
                             str(tmp_path / "one.nc")], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--standalone", "-m", "ckptscope", *args, "--out", str(tmp_path / "two.nc")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert multi.stdout.count("wrote") == 1  # rank 0 alone writes and prints
    one, two = open_result(tmp_path / "one.nc"), open_result(tmp_path / "two.nc")
    np.testing.assert_array_equal(one.loss.values, two.loss.values)
    np.testing.assert_array_equal(one.accuracy.values, two.accuracy.values)
    np.testing.assert_array_equal(one.distance.values, two.distance.values)
    assert two.attrs["world_size"] == 2 and one.attrs["world_size"] == 1
