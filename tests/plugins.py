"""User code referred to as pkg.module:attr in tests."""

from ckptscope.adapters.mlp import MLP
from ckptscope.data.spiral import load


def make_mlp():
    return MLP([2, 16, 16, 1])


def tiny_spiral():
    return load("60,40", seed=1)["test"]
