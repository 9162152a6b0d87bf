"""ckptscope: the loss landscape on the straight line between two checkpoints.

Example:
    >>> import ckptscope
    >>> ds = ckptscope.linear_path("init.safetensors", "final.safetensors",
    ...                            groups=["layers.0"], alphas=51)       # doctest: +SKIP
"""

from ckptscope.adapters import ADAPTERS, Adapter, get_adapter
from ckptscope.checkpoints import Checkpoint, check_pair, load_checkpoint, save_checkpoint
from ckptscope.correlation import Correlation, correlate
from ckptscope.data import DATASETS, Dataset, load_data
from ckptscope.directions import Directions, load_directions, random_directions, save_directions
from ckptscope.distance import relative_distance
from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.errors import CkptscopeError
from ckptscope.grids import open_grid, save_grid
from ckptscope.groups import Group, resolve_groups
from ckptscope.linear import linear_path, linear_paths
from ckptscope.planes import plane
from ckptscope.points import PointSet, alpha_grid, path_points, path_state, state_at
from ckptscope.report import report
from ckptscope.results import merge_results as merge
from ckptscope.results import open_result, save_result
from ckptscope.shape import classify
from ckptscope.trajectories import trajectory
from ckptscope.matrix_results import open_matrix, save_matrix
from ckptscope.summary import summarize
from ckptscope.surfaces import surface

# after every module that imports the package ckptscope.align: the name is the function
from ckptscope.align import PermutationSpec, align, alignment  # noqa: E402,I001

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "DATASETS",
    "Adapter",
    "PermutationSpec",
    "Checkpoint",
    "CkptscopeError",
    "Dataset",
    "EvalConfig",
    "Evaluator",
    "Group",
    "PointSet",
    "align",
    "alignment",
    "alpha_grid",
    "check_pair",
    "classify",
    "get_adapter",
    "linear_path",
    "linear_paths",
    "load_checkpoint",
    "load_data",
    "merge",
    "open_result",
    "path_points",
    "path_state",
    "relative_distance",
    "resolve_groups",
    "save_checkpoint",
    "save_result",
    "state_at",
    "trajectory",
    "open_matrix",
    "save_matrix",
    "Correlation",
    "correlate",
    "report",
    "summarize",
    "Directions",
    "load_directions",
    "open_grid",
    "plane",
    "random_directions",
    "save_directions",
    "save_grid",
    "surface",
]
