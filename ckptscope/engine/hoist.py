"""Hoist what does not move: the part of a forward pass no point changes, computed once per batch.

On a group path everything upstream of the group is the same at every point. The module is
traced with ``torch.fx`` and its graph split in two by dependence on the moving tensors:

- ``prefix(x) -> frontier``: the nodes that do not depend on them, up to the values the rest
  reads (the "frontier");
- ``suffix(*frontier) -> output``: the nodes that do.

The evaluator runs the prefix once per batch and the suffix once per point. Both halves call
the module's own submodules and parameters, so writing weights into the module, or passing them
to ``torch.func.functional_call`` by their usual names, reaches the suffix unchanged. A module
that cannot be traced is evaluated whole (:func:`split_forward` returns ``None``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

from torch import fx, nn


@dataclass(frozen=True)
class SplitForward:
    """A forward pass split at the moving tensors.

    Attributes:
        prefix: ``prefix(x) -> tuple`` of the frontier values (the same at every point).
        suffix: ``suffix(*frontier) -> output``.
        n_hoisted: graph nodes computed once per batch instead of once per point.
        n_total: graph nodes in all.
    """

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    n_hoisted: int
    n_total: int


def trace(module: nn.Module) -> fx.GraphModule | None:
    """Trace ``module`` symbolically; ``None`` when it cannot be traced."""
    try:
        return fx.symbolic_trace(module)
    except Exception:  # data-dependent control flow and friends: evaluate it whole
        return None


def _uses(node: fx.Node, gm: fx.GraphModule, moving: set[str]) -> bool:
    """Whether the node itself reads a moving tensor (through get_attr or a submodule)."""
    if node.op == "get_attr":
        target = str(node.target)
        return target in moving or any(k.startswith(target + ".") for k in moving)
    if node.op == "call_module":
        prefix = str(node.target) + "."
        return any(k.startswith(prefix) for k in moving)
    return False


def _inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


_INPLACE_OPERATORS = {
    getattr(operator, name)
    for name in dir(operator)
    if name.startswith("i") and name[1:] in dir(operator) and callable(getattr(operator, name))
} | {operator.setitem}


def _mutated(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The value a node writes in place (its first argument), or ``None``."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method":
        name = str(node.target)
        writes = name.endswith("_") and not name.endswith("__")
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        writes = (
            node.kwargs.get("inplace") is True
            or "out" in node.kwargs
            or node.target in _INPLACE_OPERATORS
            or (name.endswith("_") and not name.endswith("__"))
        )
    elif node.op == "call_module":
        writes = getattr(gm.get_submodule(str(node.target)), "inplace", False) is True
    else:
        writes = False
    return first if writes else None


# Ops whose output may share storage with their first input: a write through the output is
# a write to the input (and to every other view of it). Names of tensor methods and of
# torch / operator functions; a name list errs on the side of "may alias" (less hoisting,
# never a wrong curve).
_VIEW_NAMES = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose",
    "transpose_", "permute", "t", "squeeze", "unsqueeze", "expand", "expand_as", "narrow",
    "select", "unfold", "as_strided", "detach", "contiguous", "split", "split_with_sizes",
    "tensor_split", "chunk", "unbind", "movedim", "moveaxis", "diagonal", "swapaxes",
    "swapdims", "real", "imag", "view_as_real", "view_as_complex", "getitem", "__getitem__",
    "type_as", "to", "float", "double", "half", "bfloat16", "requires_grad_", "dropout",
    "alias", "indices", "values", "adjoint", "mT", "mH", "T", "H", "align_as", "refine_names",
    "rename",
})
# Modules that may hand back their input (or a view of it) unchanged.
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
                 nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _may_alias_input(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node``'s output may share storage with its first input."""
    if node.op in ("call_method", "call_function"):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        return str(name) in _VIEW_NAMES
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _VIEW_MODULES)
    return False


def _alias_classes(nodes: list[fx.Node], gm: fx.GraphModule) -> dict[fx.Node, frozenset]:
    """Node -> the nodes whose values may share its storage (itself included)."""
    parent = {node: node for node in nodes}

    def root(node: fx.Node) -> fx.Node:
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for node in nodes:
        base = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if base is not None and base in parent and _may_alias_input(node, gm):
            parent[root(node)] = root(base)
    classes: dict[fx.Node, set] = {}
    for node in nodes:
        classes.setdefault(root(node), set()).add(node)
    return {node: frozenset(classes[root(node)]) for node in nodes}


def _inplace_hazard(nodes: list[fx.Node], dependent: set[fx.Node], gm: fx.GraphModule) -> bool:
    """True when splitting would change what an in-place op does.

    Two cases: an op of the suffix writes into a value the prefix made (it would pile up over
    the points, which reuse that value), or an op of the prefix writes into a value that a
    suffix op read earlier in the original order (the write would now come first). A write
    through a view writes its base and every other view of it: each value that may share the
    written one's storage counts as written.
    """
    order = {node: i for i, node in enumerate(nodes)}
    aliases = _alias_classes(nodes, gm)
    for node in nodes:
        target = _mutated(node, gm)
        if target is None:
            continue
        written = aliases.get(target, frozenset({target}))
        if node in dependent and any(t not in dependent for t in written):
            return True
        if node not in dependent and any(
            user in dependent and order[user] < order[node] for t in written for user in t.users
        ):
            return True
    return False


def split_forward(gm: fx.GraphModule, moving: Iterable[str]) -> SplitForward | None:
    """Split a traced module at the nodes that depend on the ``moving`` keys.

    Returns ``None`` when nothing can be hoisted (the first node already depends on them, or
    the module's output does not depend on them at all), or when an in-place operation would
    behave differently once the graph is split (see :func:`_inplace_hazard`).
    """
    moving = set(moving)
    nodes = list(gm.graph.nodes)
    dependent: set[fx.Node] = set()
    for node in nodes:
        if node.op == "output":
            continue
        if _uses(node, gm, moving) or any(i in dependent for i in _inputs(node)):
            dependent.add(node)
    output = next(n for n in nodes if n.op == "output")
    if not any(i in dependent for i in _inputs(output)) or _inplace_hazard(nodes, dependent, gm):
        return None
    frontier = [
        n
        for n in nodes
        if n.op != "output"
        and n not in dependent
        and any(user in dependent or user is output for user in n.users)
    ]
    computed = [n for n in nodes if n.op not in ("output", "placeholder") and n not in dependent]
    # Only the input crosses: nothing upstream of the group would be saved.
    if all(n.op == "placeholder" for n in frontier) or not computed:
        return None

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op != "output" and node not in dependent:
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(tuple(env[n] for n in frontier))

    suffix_graph = fx.Graph()
    env2: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(frontier):
        env2[node] = suffix_graph.placeholder(f"frontier_{i}")
    for node in nodes:
        if node in dependent or node.op == "output":
            env2[node] = suffix_graph.node_copy(node, lambda n: env2[n])
    return SplitForward(
        prefix=fx.GraphModule(gm, prefix_graph),
        suffix=fx.GraphModule(gm, suffix_graph),
        n_hoisted=len(computed),
        n_total=sum(n.op not in ("output", "placeholder") for n in nodes),
    )
