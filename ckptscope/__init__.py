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
from ckptscope.matrix_results import open_matrix, save_matrix
from ckptscope.planes import plane
from ckptscope.points import PointSet, alpha_grid, path_points, path_state, state_at
from ckptscope.report import report
from ckptscope.results import merge_results as merge
from ckptscope.results import open_result, save_result
from ckptscope.shape import classify
from ckptscope.summary import summarize
from ckptscope.surfaces import surface
from ckptscope.trajectories import trajectory

# after every module that imports the package ckptscope.align: the name is the function
from ckptscope.align import PermutationSpec, align, alignment  # noqa: E402,I001

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "DATASETS",
    "Adapter",
    "Checkpoint",
    "CkptscopeError",
    "Correlation",
    "Dataset",
    "Directions",
    "EvalConfig",
    "Evaluator",
    "Group",
    "PermutationSpec",
    "PointSet",
    "align",
    "alignment",
    "alpha_grid",
    "check_pair",
    "classify",
    "correlate",
    "get_adapter",
    "linear_path",
    "linear_paths",
    "load_checkpoint",
    "load_data",
    "load_directions",
    "merge",
    "open_grid",
    "open_matrix",
    "open_result",
    "path_points",
    "path_state",
    "plane",
    "random_directions",
    "relative_distance",
    "report",
    "resolve_groups",
    "save_checkpoint",
    "save_directions",
    "save_grid",
    "save_matrix",
    "save_result",
    "state_at",
    "summarize",
    "surface",
    "trajectory",
]
