"""Permutation specs: which tensor axes share one permutation of hidden units.

Permuting the hidden units of a network (a Linear's or a Conv's output channels, and with them
everything that reads those channels) leaves the function it computes unchanged. A
:class:`PermutationSpec` names each such class of axes; :func:`spec_from_graph` derives it from
the model's ``torch.fx`` graph:

- a Linear's / Conv's output channels (weight axis 0, bias) start a class, which the next
  Linear's / Conv's input axis (weight axis 1) joins;
- BatchNorm, InstanceNorm, LayerNorm over the channel axis and GroupNorm with one group or one
  channel per group carry the class, with their affine tensors and running statistics;
- elementwise activations, dropout, pooling and a flatten after a global pool carry it;
- a residual add (or any elementwise op of two tensors) ties its inputs' classes into one;
- a depthwise conv (groups = channels) carries its input's class through its weight axis 0;
- a flatten of a (N, C, ...) feature map that was not pooled, read by a Linear: the Linear's
  input axis holds C blocks of the positions' features, and the class permutes the blocks (a
  *blocked* axis ``(key, dim, block)``, ``block`` = features per channel);
- tied tensors (two keys, one tensor) are permuted alike.

Everything else is left fixed: the model's input and output axes, grouped convs, reshapes and
concatenations, attention, modules and functions the rules do not know, tensors read directly
from the graph. A class that meets anything fixed stays fixed as a whole; the spec's
:meth:`~PermutationSpec.note` names what was left fixed and why.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ckptscope.errors import CkptscopeError

Axis = tuple[str, int] | tuple[str, int, int]  # (key, dim) or (key, dim, block): see below
Site = tuple[str, int]  # (fx node name, channel dim of its output)

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardtanh, F.mish, F.softplus,
    F.dropout, torch.relu, torch.tanh, torch.sigmoid, F.sigmoid, F.tanh, torch.clone,
    torch.nn.functional.hardswish,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "clone", "contiguous", "float",
                        "detach", "clamp", "clamp_"}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
           torch.add, torch.sub, torch.mul}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_SHAPE_READS = {"size", "dim"}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                   F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_avg_pool3d, F.adaptive_max_pool2d}
_EXPECTED = ("the model's input", "the model's output")  # fixed by nature, not worth a note


@dataclass(frozen=True)
class PermutationSpec:
    """Classes of tensor axes that one permutation of hidden units acts on together.

    Attributes:
        classes: class name -> the axes ``(key, dim)`` it permutes; every axis of a class has
            the class's size. ``(key, dim, block)`` permutes blocks of ``block`` consecutive
            entries along ``dim`` (a Linear after a flatten of C channels of ``block``
            positions each), whose size is ``shape[dim] // block``. Give one by hand for a
            model :func:`spec_from_graph` cannot read:
            ``PermutationSpec({"h1": (("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1))})``.
        sites: class name -> the fx nodes ``(name, channel dim)`` whose outputs hold the class's
            channels (what activation matching correlates); empty for a hand-made spec.
        fixed: one line per reason something was left fixed (``"grouped conv 'conv2': ..."``).
    """

    classes: Mapping[str, tuple[Axis, ...]]
    sites: Mapping[str, tuple[Site, ...]] = field(default_factory=dict)
    fixed: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "classes",
                           {str(k): tuple((str(ax[0]), *map(int, ax[1:])) for ax in axes)
                            for k, axes in self.classes.items()})
        object.__setattr__(self, "sites", {k: tuple(v) for k, v in self.sites.items()})
        object.__setattr__(self, "fixed", tuple(self.fixed))

    @property
    def permuted(self) -> list[str]:
        """The keys with at least one permuted axis, sorted."""
        return sorted({ax[0] for axes in self.classes.values() for ax in axes})

    def note(self, state: Mapping[str, torch.Tensor] | None = None) -> str:
        """One line: what was left fixed and why (``""`` when only the input and output are)."""
        parts = list(self.fixed)
        if state is not None:
            permuted = set(self.permuted)
            untouched = sorted(k for k, v in state.items()
                               if v.is_floating_point() and k not in permuted)
            if untouched and parts:
                shown = ", ".join(untouched[:6]) + (", ..." if len(untouched) > 6 else "")
                parts.append(f"{len(untouched)} tensor(s) not permuted at all ({shown})")
        return ("left fixed: " + "; ".join(parts)) if parts else ""


def check_spec(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Return class name -> size after checking ``spec`` against a state dict's keys and shapes.

    Raises:
        CkptscopeError: no class, an unknown key, a dim out of range, a non-float tensor, or
            axes of one class with different sizes.
    """
    if not spec.classes:
        raise CkptscopeError("the permutation spec has no class: nothing to permute.")
    sizes = {}
    for name, axes in spec.classes.items():
        if not axes:
            raise CkptscopeError(f"permutation class {name!r} holds no axis; drop it.")
        found = {}
        for key, dim, *block in axes:
            if key not in state:
                raise CkptscopeError(
                    f"permutation class {name!r} names {key!r}, which is not in the state "
                    f"(keys start with {sorted(state)[:5]}); fix the spec."
                )
            tensor = state[key]
            if not tensor.is_floating_point():
                raise CkptscopeError(
                    f"permutation class {name!r} names {key!r} ({tensor.dtype}); only floating "
                    f"tensors are permuted: integer buffers stay as they are."
                )
            if not -tensor.dim() <= dim < tensor.dim():
                raise CkptscopeError(
                    f"permutation class {name!r}: {key!r} has {tensor.dim()} dims, no dim {dim}."
                )
            if block and (block[0] < 1 or tensor.shape[dim] % block[0]):
                raise CkptscopeError(
                    f"permutation class {name!r}: {key!r} dim {dim} ({tensor.shape[dim]}) is not "
                    f"a whole number of blocks of {block[0]}."
                )
            found[(key, dim)] = int(tensor.shape[dim]) // (block[0] if block else 1)
        if len(set(found.values())) != 1:
            raise CkptscopeError(
                f"permutation class {name!r} mixes sizes "
                f"{', '.join(f'{k}[{d}]={n}' for (k, d), n in found.items())}; one permutation "
                f"needs axes of one size."
            )
        sizes[name] = next(iter(found.values()))
    return sizes


# --- derivation from the fx graph ----------------------------------------------------------
class _Classes:
    """Union-find over axis variables, remembering why a variable must stay fixed."""

    def __init__(self):
        self.parent: dict[object, object] = {}
        self.reason: dict[object, str] = {}

    def find(self, v):
        self.parent.setdefault(v, v)
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, *vs) -> object:
        roots = [self.find(v) for v in vs]
        first = roots[0]
        for r in roots[1:]:
            if r != first:
                self.parent[r] = first
                if r in self.reason and first not in self.reason:
                    self.reason[first] = self.reason[r]
        return first

    def fix(self, v, reason: str) -> None:
        root = self.find(v)
        self.reason.setdefault(root, reason)

    def why(self, v) -> str | None:
        return self.reason.get(self.find(v))


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # any tracing failure is the model's shape, not a bug here
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise CkptscopeError(
            f"torch.fx cannot trace {type(model).__name__} ({reason}), so its permutation "
            f"spec cannot be derived; give one by hand (ckptscope.align.PermutationSpec)."
        ) from None


def spec_from_graph(model: nn.Module) -> PermutationSpec:
    """Derive the permutation spec of ``model`` from its ``torch.fx`` graph (rules above).

    Raises:
        CkptscopeError: fx cannot trace the model, or nothing in it can be permuted.
    """
    graph = _trace(model)
    state = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for key, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(key)
    walk = _Walk(model, state)
    for node in graph.graph.nodes:
        walk.visit(node)
    return walk.spec(aliases)


class _Walk:
    """One pass over the graph's nodes, in order, joining and fixing axis variables."""

    def __init__(self, model: nn.Module, state: Mapping[str, torch.Tensor]):
        self.model, self.state = model, state
        self.uf = _Classes()
        self.var: dict[fx.Node, object] = {}  # node -> the variable of its channel axis
        self.dim: dict[fx.Node, int] = {}  # node -> its channel dim (1 or -1)
        self.pooled: set[fx.Node] = set()  # outputs of a global pool
        self.flat: set[fx.Node] = set()  # flattened (N, C, ...) maps: C blocks of positions
        self.notes: list[str] = []

    # helpers
    def _param(self, prefix: str, name: str, dim: int, *, blocked: bool = False):
        key = f"{prefix}.{name}" if prefix else name
        tensor = self.state.get(key)
        if tensor is None or not tensor.is_floating_point():
            return None
        return ("blocks" if blocked else "axis", key, dim)

    def _join(self, *vs):
        return self.uf.union(*[v for v in vs if v is not None])

    def _fresh(self, node: fx.Node, dim: int):
        self.var[node], self.dim[node] = ("node", node.name), dim
        return self.var[node]

    def _carry(self, node: fx.Node, source: fx.Node, *, dim: int | None = None) -> None:
        if source not in self.var:
            self._fix_node(node, f"{node.name}: input has no channel axis")
            return
        self.var[node] = self.var[source]
        self.dim[node] = self.dim[source] if dim is None else dim
        if source in self.flat:  # dropout, an activation after the flatten: still blocks
            self.flat.add(node)

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
        return [n for n in found if n in self.var]

    def _fix_node(self, node: fx.Node, reason: str, *, params: str | None = None) -> None:
        """Fix the node's inputs, its output and (a module's) parameters; the note names the
        reason when it fixed something that was free (a reshape of the model's input is not)."""
        inputs = self._inputs(node)
        free = params is not None or any(self.uf.why(self.var[n]) is None for n in inputs)
        for n in inputs:
            self.uf.fix(self.var[n], reason)
        self.uf.fix(self._fresh(node, 1), reason)
        if params is not None:
            module = self.model.get_submodule(params)
            for name, tensor in module.named_parameters(recurse=True):
                for d in range(tensor.dim()):
                    self.uf.fix(("axis", f"{params}.{name}", d), reason)
        if free and reason not in _EXPECTED and reason not in self.notes:
            self.notes.append(reason)

    # the rules
    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.uf.fix(self._fresh(node, 1), "the model's input")
        elif node.op == "output":
            for n in self._inputs(node):
                self.uf.fix(self.var[n], "the model's output")
        elif node.op == "get_attr":
            self._fix_node(node, f"tensor {node.target!r} read directly in forward")
            tensor = self.state.get(str(node.target))
            for d in range(tensor.dim() if tensor is not None else 0):
                self.uf.fix(("axis", str(node.target), d), f"tensor {node.target!r} read directly")
        elif node.op == "call_module":
            self._module(node, self.model.get_submodule(str(node.target)))
        elif node.op == "call_function":
            self._function(node, node.target, node.args)
        elif node.op == "call_method":
            self._method(node, str(node.target), node.args)

    def _module(self, node: fx.Node, module: nn.Module) -> None:
        name = str(node.target)
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if x is None or x not in self.var:
            self._fix_node(node, f"module {name!r} ({type(module).__name__}) without a tensor "
                                 f"input", params=name)
        elif isinstance(module, nn.Linear):
            self._join(self.var[x], self._param(name, "weight", 1, blocked=x in self.flat))
            self._join(self._fresh(node, -1), self._param(name, "weight", 0),
                       self._param(name, "bias", 0))
        elif isinstance(module, _CONVS):
            if module.groups == 1:
                self._join(self.var[x], self._param(name, "weight", 1))
                self._join(self._fresh(node, 1), self._param(name, "weight", 0),
                           self._param(name, "bias", 0))
            elif module.groups == module.in_channels == module.out_channels:  # depthwise
                self._join(self.var[x], self._param(name, "weight", 0),
                           self._param(name, "bias", 0))
                self._carry(node, x, dim=1)
            else:
                self._fix_node(node, f"grouped conv {name!r} (groups={module.groups}) mixes "
                                     f"channels within groups", params=name)
        elif isinstance(module, _BATCHNORMS):
            self._channelwise(node, x, name, ("weight", "bias", "running_mean", "running_var"),
                              dim=1)
        elif isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) == 1 and self.dim[x] == -1:
                self._channelwise(node, x, name, ("weight", "bias"), dim=-1)
            else:
                self._fix_node(node, f"LayerNorm {name!r} normalises over more than the channel "
                                     f"axis", params=name)
        elif isinstance(module, nn.GroupNorm):
            if module.num_groups in (1, module.num_channels):
                self._channelwise(node, x, name, ("weight", "bias"), dim=1)
            else:
                self._fix_node(node, f"GroupNorm {name!r} ({module.num_groups} groups) ties "
                                     f"channels in groups", params=name)
        elif isinstance(module, nn.PReLU):
            self._channelwise(node, x, name, ("weight",) if module.num_parameters > 1 else (),
                              dim=None)
        elif isinstance(module, _ELEMENTWISE_MODULES):
            self._carry(node, x)
        elif isinstance(module, _POOL_MODULES):
            self._carry(node, x)
            size = getattr(module, "output_size", None)
            if size is not None and all(s == 1 for s in _as_tuple(size)):
                self.pooled.add(node)
        elif isinstance(module, nn.Flatten):
            self._flatten(node, x, module.start_dim, module.end_dim)
        else:
            self._fix_node(node, f"module {name!r} ({type(module).__name__}) is not one the "
                                 f"rules know", params=name)

    def _channelwise(self, node, x, name, params: Sequence[str], *, dim: int | None) -> None:
        self._join(self.var[x], *(self._param(name, p, 0) for p in params))
        self._carry(node, x, dim=dim)

    def _flatten(self, node, x, start: int = 0, end: int = -1) -> None:
        if x in self.pooled and start == 1 and end == -1:
            self._carry(node, x, dim=-1)
        elif start == 1 and end == -1 and self.dim.get(x) == 1 and x not in self.flat:
            # channel-major: C blocks of positions, which only a Linear can read (blocked axis);
            # anything else that reads it fixes the class through the shared variable
            self._carry(node, x, dim=-1)
            self.flat.add(node)
        else:
            self._fix_node(node, f"{node.name}: a reshape that mixes channels with other axes")

    def _function(self, node: fx.Node, fn, args) -> None:
        x = args[0] if args and isinstance(args[0], fx.Node) else None
        if fn in _ELEMENTWISE_FUNCTIONS and x in self.var:
            self._carry(node, x)
        elif fn in _BINARY:
            tensors = [a for a in args if isinstance(a, fx.Node) and a in self.var]
            if not tensors:
                return  # arithmetic on sizes
            self._join(*(self.var[t] for t in tensors))
            self._carry(node, tensors[0])
        elif fn in _POOL_FUNCTIONS and x in self.var:
            self._carry(node, x)
            size = args[1] if len(args) > 1 else node.kwargs.get("output_size")
            if "adaptive" in fn.__name__ and all(s == 1 for s in _as_tuple(size)):
                self.pooled.add(node)
        elif fn is torch.flatten and x in self.var:
            self._flatten(node, x, *(list(args[1:3]) or [node.kwargs.get("start_dim", 0)]))
        elif fn is getattr or (x is not None and x not in self.var):
            return  # a size or shape read, or arithmetic on one
        elif fn is torch.mean and x in self.var:
            self._mean(node, x, args[1:], node.kwargs)
        else:
            self._fix_node(node, f"function {getattr(fn, '__name__', fn)!s} at {node.name} is "
                                 f"not one the rules know")

    def _method(self, node: fx.Node, method: str, args) -> None:
        x = args[0] if args and isinstance(args[0], fx.Node) else None
        if method in _SHAPE_READS or x not in self.var:
            return
        if method in _ELEMENTWISE_METHODS:
            self._carry(node, x)
        elif method in _BINARY_METHODS:
            tensors = [a for a in args if isinstance(a, fx.Node) and a in self.var]
            self._join(*(self.var[t] for t in tensors))
            self._carry(node, x)
        elif method == "flatten":
            rest = list(args[1:3]) or [node.kwargs.get("start_dim", 0)]
            self._flatten(node, x, *rest)
        elif method in ("view", "reshape") and len(args) == 3 and args[2] == -1:
            self._flatten(node, x, 1, -1)  # x.view(x.size(0), -1)
        elif method == "mean":
            self._mean(node, x, args[1:], node.kwargs)
        else:
            self._fix_node(node, f"method .{method}() at {node.name} is not one the rules know")

    def _mean(self, node, x, args, kwargs) -> None:
        dims = args[0] if args else kwargs.get("dim")
        keep = bool(args[1] if len(args) > 1 else kwargs.get("keepdim", False))
        if self.dim[x] == 1 and dims is not None and 1 not in _as_tuple(dims) \
                and all(d >= 2 or d < 0 for d in _as_tuple(dims)):
            self._carry(node, x, dim=1 if keep else -1)
            self.pooled.add(node)  # spatial means: flattening after them carries the channels
        else:
            self._fix_node(node, f"{node.name}: a mean over the channel axis")

    # the result
    def spec(self, aliases: Mapping[int, list[str]]) -> PermutationSpec:
        members: dict[object, list[Axis]] = {}
        for key, tensor in self.state.items():
            if not tensor.is_floating_point():
                continue
            for d in range(tensor.dim()):
                for kind in ("axis", "blocks"):
                    if (kind, key, d) in self.uf.parent:
                        members.setdefault(self.uf.find((kind, key, d)), []).append(
                            (key, d) if kind == "axis" else (key, d, 0))
        classes: dict[str, tuple[Axis, ...]] = {}
        roots: dict[object, str] = {}
        for root, axes in members.items():
            if self.uf.why(root) is not None:
                continue
            plain = {self.state[ax[0]].shape[ax[1]] for ax in axes if len(ax) == 2}
            if len(plain) != 1:  # a class of blocked axes only cannot be sized
                continue
            size = plain.pop()
            if any(len(ax) == 3 and self.state[ax[0]].shape[ax[1]] % size for ax in axes):
                self.notes.append(f"a flatten feeding {axes[-1][0]!r} does not split into "
                                  f"{size} channels")
                continue
            # tied tensors: every alias of a permuted tensor is permuted alike
            every = []
            for key, d, *blocked in axes:
                block = (self.state[key].shape[d] // size,) if blocked else ()
                for alias in aliases[id(self.state[key])]:
                    if (alias, d, *block) not in every:
                        every.append((alias, d, *block))
            name = _class_name(every, classes)
            classes[name] = tuple(every)
            roots[root] = name
        sites: dict[str, list[Site]] = {name: [] for name in classes}
        for node, v in self.var.items():
            root = self.uf.find(v)
            if root in roots and node.op != "placeholder" and node not in self.flat:
                sites[roots[root]].append((node.name, self.dim[node]))
        if not classes:
            why = "; ".join(self.notes) or "every hidden axis meets the input or the output"
            raise CkptscopeError(
                f"nothing in {type(self.model).__name__} can be permuted ({why}); alignment "
                f"needs hidden units between two layers, or a spec given by hand."
            )
        return PermutationSpec(classes, {k: tuple(v) for k, v in sites.items()},
                               tuple(self.notes))


def _class_name(axes: Sequence[Axis], taken: Mapping[str, object]) -> str:
    """The class's name: the module whose output channels it is (``layer1.0.conv1``)."""
    outputs = [ax[0] for ax in axes if ax[1] == 0 and ax[0].endswith(".weight")]
    key = (outputs or [axes[0][0]])[0]
    name = key.rsplit(".", 1)[0] if "." in key else key
    while name in taken:
        name += "'"
    return name


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
