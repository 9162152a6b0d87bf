"""The companion trainer (a leaf: the core never imports it)."""

from ckptscope.train.loop import TrainConfig, fit

__all__ = ["TrainConfig", "fit"]
