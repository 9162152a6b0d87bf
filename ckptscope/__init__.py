"""ckptscope: the loss landscape on the straight line between two checkpoints.

Example:
    >>> import ckptscope
    >>> ds = ckptscope.linear_path("init.safetensors", "final.safetensors",
    ...                            groups=["layers.0"], alphas=51)       # doctest: +SKIP
"""

from ckptscope.adapters import ADAPTERS, Adapter, get_adapter
from ckptscope.analysis import linear_path
from ckptscope.checkpoints import Checkpoint, check_pair, load_checkpoint, save_checkpoint
from ckptscope.data import DATASETS, Dataset, load_data
from ckptscope.distance import relative_distance
from ckptscope.errors import CkptscopeError
from ckptscope.evaluate import EvalConfig, Evaluator
from ckptscope.groups import Group, resolve_groups
from ckptscope.path import alpha_grid, plan_path, state_at
from ckptscope.results import open_result, save_result

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "DATASETS",
    "Adapter",
    "Checkpoint",
    "CkptscopeError",
    "Dataset",
    "EvalConfig",
    "Evaluator",
    "Group",
    "alpha_grid",
    "check_pair",
    "get_adapter",
    "linear_path",
    "load_checkpoint",
    "load_data",
    "open_result",
    "plan_path",
    "relative_distance",
    "resolve_groups",
    "save_checkpoint",
    "save_result",
    "state_at",
]
