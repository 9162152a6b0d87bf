"""The companion trainer (a leaf: the core never imports it).

Example:
    >>> from ckptscope.train import load_recipe, run
    >>> out = run(load_recipe("mlp-spiral-fig1a"), seed=0, out="runs/spiral/seed_0")
"""

from ckptscope.train.loop import TrainConfig, fit
from ckptscope.train.recipe import Recipe, load_recipe, override, recipe_names
from ckptscope.train.run import RunOutput, run

__all__ = ["Recipe", "RunOutput", "TrainConfig", "fit", "load_recipe", "override",
           "recipe_names", "run"]
