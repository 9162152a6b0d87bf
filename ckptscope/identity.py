"""Identity: which tensors are which, and the fingerprint of everything a curve depends on.

Tensors. A module may hold one tensor under several names (tied weights: an embedding and its
output layer; one buffer registered in two modules). Whatever moves, counts or compares tensors
asks here which names are one tensor: the engine moves a tied tensor once, under every name it
has; distances count it once. The parameter / buffer / non-float split lives here too.

Fingerprints. A resumed evaluation reuses a stored chunk of a curve only when its fingerprint
matches, so it has to change whenever the curve could: the anchors' tensors, the model's code
and configuration, the loss, the data, the settings, and the software and hardware the numbers
come from. It is a sha256 over a canonical JSON form of:

- the anchors: a digest of each state's keys, dtypes, shapes and bytes (:func:`tensor_digest`);
- the model: for every submodule its class (module and qualname, the sha256 of its source
  where ``inspect`` can read it, and always a digest of the bytecode, constants and names of
  every method of the class and its non-library bases), its attributes (numbers, strings,
  tuples, callables by the same code digest, plain tensors by their bytes; its own parameters
  and buffers by position only, since the anchors replace them) and its forward hooks; the
  state-dict layout and ``repr``. Two classes with one name and ``repr`` but another
  activation differ in their code; two ``Net(scale=2)`` and ``Net(scale=3)`` in an attribute;
- the loss: a built-in by its name; a callable by its qualname, the digest of its code object
  (bytecode, constants, names: two lambdas differ), its defaults, the values it closes over,
  and the functions and constants it reads by global name (three levels deep);
- the data: a digest of every evaluated tensor (inputs and targets per split, and the training
  inputs of ``bn="recompute"``);
- the settings the caller passes (alphas, hold, dtype, BatchNorm policy, batch size, ...) and
  the environment: ckptscope, torch, numpy and Python versions, the device (the GPU's name),
  torch's CPU capability and thread count.

Library code (``torch``, ``numpy``, the standard library, ``transformers``) is named, not
digested: its version is in the key. A value that cannot be identified (an object whose
``repr`` is only an address, a lock, a file) is listed in :attr:`Fingerprint.unknown`; callers
then refuse to reuse anything rather than risk another model's curve.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import sys
import types
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

FINGERPRINT_VERSION = 2  # 2: the whole-model path takes non-float tensors from the nearer end
# Named, not digested: their versions are part of the environment.
_LIBRARIES = ("torch", "numpy", "builtins", "math", "functools", "typing", "collections",
              "abc", "operator", "itertools", "enum", "dataclasses")
# Model libraries, named like torch (digesting transformers' sources took 14 minutes for a tiny
# GPT-2 on 2 cores); their versions join the environment when they are imported.
_MODEL_LIBRARIES = ("transformers", "tokenizers")
_LIBRARIES += _MODEL_LIBRARIES
_DEPTH = 6  # nesting of values
_GLOBAL_DEPTH = 3  # functions reached through global names
# Attributes every nn.Module has: torch's bookkeeping (the hooks are digested on their own).
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}
_HOOKS = ("_forward_pre_hooks", "_forward_hooks")
_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the keys, dtypes, shapes and bytes of a state dict (sorted by key)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # the tensor's own bytes (a memory-mapped file's pages), not a copy
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _library(obj: object) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in _LIBRARIES


def _name(obj: object) -> str:
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return f"{getattr(obj, '__module__', None)}.{qualname or type(obj).__qualname__}"


def _const(value: object) -> object:
    """A code object's constant, canonical (a frozenset's order changes with the hash seed)."""
    if isinstance(value, types.CodeType):
        return _code(value)
    if isinstance(value, frozenset):
        return sorted(repr(v) for v in value)
    if isinstance(value, tuple):
        return [_const(v) for v in value]
    return repr(value)


@functools.lru_cache(maxsize=4096)
def _code(code: types.CodeType) -> str:
    """Digest of a code object: its bytecode, constants (nested code too), names and
    arguments. Line numbers are not in it: moving a function does not change it."""
    return _sha(json.dumps([
        code.co_code.hex(), [_const(c) for c in code.co_consts], list(code.co_names),
        list(code.co_varnames), list(code.co_freevars), code.co_argcount,
        code.co_kwonlyargcount, code.co_flags,
    ]))


def _global_names(code: types.CodeType) -> list[str]:
    """The names a code object (and the code nested in it) looks up."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return sorted(set(names))


def _source_digest(obj: object) -> str | None:
    try:
        return _sha(inspect.getsource(obj))
    except Exception:  # no source (a class made in `python -c`, a notebook): the bytecode says
        return None


@dataclass(frozen=True)
class Fingerprint:
    """What :func:`curve_fingerprint` found.

    Attributes:
        key: sha256 hex of everything the curves depend on.
        unknown: the values it could not identify (where, and their type); when not empty a
            stored curve cannot be trusted to belong to these inputs.
    """

    key: str
    unknown: tuple[str, ...] = ()


class _Canon:
    """Turns values into a canonical JSON form; remembers the values it could not identify."""

    def __init__(self) -> None:
        self.unknown: list[str] = []
        self._classes: dict[type, object] = {}
        self._open: set[int] = set()  # ids on the current recursion path (cycles)
        self._own: set[int] = set()  # storages of the model's own parameters and buffers

    def value(self, v: object, where: str, depth: int = 0, *, strict: bool = True) -> object:
        """Canonical form of ``v``; ``strict``: an unidentifiable value is recorded."""
        if isinstance(v, _SCALARS):
            return [type(v).__name__, repr(v)]
        if depth > _DEPTH:
            return self._opaque(v, where, strict, "nested too deep")
        if id(v) in self._open:
            return ["cycle", type(v).__qualname__]
        self._open.add(id(v))
        try:
            return self._value(v, where, depth, strict)
        finally:
            self._open.discard(id(v))

    def _value(self, v: object, where: str, depth: int, strict: bool) -> object:
        d = depth + 1
        if isinstance(v, enum.Enum):
            return ["enum", _name(type(v)), v.name]
        if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return ["torch", repr(v)]
        if isinstance(v, torch.Tensor):
            try:
                if v.numel() and v.untyped_storage().data_ptr() in self._own:
                    return ["own tensor", str(v.dtype), list(v.shape)]  # the anchors replace it
                return ["tensor", tensor_digest({"": v})]
            except (RuntimeError, TypeError, NotImplementedError):  # sparse, meta, ...
                return self._opaque(v, where, strict, "a tensor without plain storage")
        if isinstance(v, (np.ndarray, np.generic)):
            a = np.ascontiguousarray(v)
            return ["ndarray", str(a.dtype), list(a.shape), _sha(a.tobytes())]
        if isinstance(v, (list, tuple)):
            return [type(v).__name__, [self.value(x, f"{where}[{i}]", d, strict=strict)
                                       for i, x in enumerate(v)]]
        if isinstance(v, (set, frozenset)):
            items = [self.value(x, f"{where}{{}}", d, strict=strict) for x in v]
            return ["set", sorted(items, key=json.dumps)]
        if isinstance(v, Mapping):
            items = [[self.value(k, f"{where} key", d, strict=strict),
                      self.value(x, f"{where}[{k!r}]", d, strict=strict)] for k, x in v.items()]
            return ["map", sorted(items, key=json.dumps)]
        if isinstance(v, nn.Module):  # not a registered submodule (those are walked): by class
            return ["module", self.cls(type(v)), repr(v)]
        if isinstance(v, type):
            return ["class", self.cls(v)]
        if isinstance(v, types.ModuleType):
            return ["python module", v.__name__]
        if isinstance(v, functools.partial):
            return ["partial", self.value(v.func, where, d, strict=strict),
                    self.value(v.args, where, d, strict=strict),
                    self.value(v.keywords, where, d, strict=strict)]
        if isinstance(v, types.MethodType):
            owner = v.__self__
            return ["method", self.function(v.__func__, where, d),
                    self.cls(type(owner)) if isinstance(owner, nn.Module)
                    else self.value(owner, f"{where}.__self__", d, strict=strict)]
        if isinstance(v, types.FunctionType):
            return self.function(v, where, d)
        if callable(v) and not hasattr(v, "__dict__") and _library(v):
            return ["library callable", _name(v)]  # torch.tanh, math.exp: their versions say
        if hasattr(v, "__dict__") and not isinstance(v, types.BuiltinFunctionType):
            return ["object", self.cls(type(v)), self.value(
                {k: x for k, x in vars(v).items() if not k.startswith("__")},
                where, d, strict=strict)]
        text = repr(v)
        if " at 0x" in text or "object at" in text:
            return self._opaque(v, where, strict, "no value to compare")
        return ["repr", type(v).__qualname__, text]

    def _opaque(self, v: object, where: str, strict: bool, why: str) -> object:
        if strict:
            self.unknown.append(f"{where} ({type(v).__qualname__}: {why})")
        return ["opaque", _name(type(v))]

    def function(self, fn: types.FunctionType, where: str, depth: int = 0) -> object:
        """A Python function: its name, code, defaults, closure and what it reads globally."""
        if _library(fn):
            return ["library function", _name(fn)]
        cells = []
        for i, cell in enumerate(fn.__closure__ or ()):
            try:
                cells.append(self.value(cell.cell_contents, f"{where} closure {i}", depth + 1))
            except ValueError:  # an empty cell
                cells.append(None)
        found = []
        if depth <= _GLOBAL_DEPTH:
            for name in _global_names(fn.__code__):
                if name in fn.__globals__:
                    found.append([name, self._global(fn.__globals__[name], name, depth + 1)])
        return ["function", _name(fn), _code(fn.__code__),
                self.value(fn.__defaults__, f"{where} defaults", depth + 1),
                self.value(fn.__kwdefaults__, f"{where} keyword defaults", depth + 1),
                cells, found]

    def _global(self, v: object, name: str, depth: int) -> object:
        """What a function reads by a global name: code is followed (not too deep), plain
        values compared, anything else named (a module-level logger is not configuration)."""
        if isinstance(v, types.FunctionType):
            if depth > _GLOBAL_DEPTH:
                return ["function", _name(v), _code(v.__code__)]
            return self.function(v, f"global {name}", depth)
        if isinstance(v, type):
            return ["class", self.cls(v)]
        return self.value(v, f"global {name}", _DEPTH - 1, strict=False)

    def cls(self, c: type) -> object:
        """A class: its name; for non-library code the source digest and every method's."""
        if c in self._classes:
            return self._classes[c]
        if _library(c):
            self._classes[c] = _name(c)
            return self._classes[c]
        self._classes[c] = ["class", _name(c)]  # for a method that names its own class
        parts = []
        for klass in c.__mro__:
            if _library(klass) or klass is object:
                continue
            members = []
            for attr, member in sorted(vars(klass).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                fns = ([f for f in (member.fget, member.fset) if f is not None]
                       if isinstance(member, property) else [member])
                if all(isinstance(f, types.FunctionType) for f in fns):
                    where = f"{_name(klass)}.{attr}"
                    members.append([attr, [self.function(f, where) for f in fns]])
                elif not attr.startswith("_"):  # class-level settings (SCALE = 2)
                    members.append([attr, self.value(member, attr, _DEPTH - 1, strict=False)])
            parts.append([_name(klass), _source_digest(klass), members])
        self._classes[c] = ["class", _name(c), _sha(json.dumps(parts))]
        return self._classes[c]

    def model(self, module: nn.Module) -> object:
        """Every submodule's class, attributes and hooks; the state layout and ``repr``."""
        own = [*module.parameters(), *module.buffers()]
        self._own = {t.untyped_storage().data_ptr() for t in own
                     if t.numel() and t.layout == torch.strided and t.device.type != "meta"}
        modules = []
        for name, m in module.named_modules(remove_duplicate=False):
            where = f"model attribute {name or type(m).__qualname__}"
            attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
            hooks = [list(getattr(m, h, {}).values()) for h in _HOOKS]
            modules.append([name, self.cls(type(m)), self.value(attrs, where),
                            self.value(hooks, f"{where} hooks")])
        state = [[k, str(v.dtype), list(v.shape)] for k, v in module.state_dict().items()]
        return {"modules": modules, "state": state, "repr": repr(module)}

    def loss(self, loss: object) -> object:
        if isinstance(loss, str):
            return ["built-in", loss]
        return self.value(loss, "the loss")


def environment(device: torch.device) -> dict:
    """Versions and hardware the numbers depend on (kernels differ between them)."""
    from ckptscope import __version__

    cpu = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    env = {
        "ckptscope": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": sys.version.split()[0], "cpu": cpu, "threads": torch.get_num_threads(),
        "device": str(device),
    }
    env.update({name: getattr(sys.modules[name], "__version__", "unknown")
                for name in _MODEL_LIBRARIES if name in sys.modules})
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def curve_fingerprint(
    *,
    module: nn.Module,
    loss: object,
    anchors: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
    data: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    bn_data: torch.Tensor | None,
    settings: Mapping[str, object],
    device: torch.device,
) -> Fingerprint:
    """Fingerprint what a path's curves depend on (see the module docstring).

    Args:
        module: the architecture (its own weights do not count: the anchors replace them).
        loss: a built-in loss name or a callable.
        anchors: the two endpoint states.
        data: split -> (inputs, targets), as evaluated.
        bn_data: training inputs for ``bn="recompute"``, or ``None``.
        settings: every other choice the curves depend on, JSON-able values.
        device: where the evaluation runs.
    """
    canon = _Canon()
    fields = {
        "fingerprint": FINGERPRINT_VERSION,
        "anchors": [tensor_digest(state) for state in anchors],
        "model": canon.model(module),
        "loss": canon.loss(loss),
        "data": {split: tensor_digest({"x": x, "y": y}) for split, (x, y) in data.items()},
        "bn_data": None if bn_data is None else tensor_digest({"x": bn_data}),
        "settings": canon.value(dict(settings), "settings"),
        "environment": environment(device),
    }
    key = _sha(json.dumps(fields, sort_keys=True, separators=(",", ":")))
    return Fingerprint(key, tuple(canon.unknown))


_CLASS_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _class_digest(c: type, canon: _Canon) -> str:
    """:meth:`_Canon.cls` of ``c`` as text, kept per class object: reading sources is slow,
    and a class redefined (a new object) is digested anew."""
    if c not in _CLASS_DIGESTS:
        _CLASS_DIGESTS[c] = json.dumps(canon.cls(c))
    return _CLASS_DIGESTS[c]


def model_identity(module: nn.Module, loss: object) -> str:
    """A short digest of the model's code and the loss: the classes of every submodule (their
    source and methods' bytecode, as :func:`curve_fingerprint` reads them), the state layout,
    and the loss. Recorded in results so that :func:`ckptscope.merge` refuses runs of other
    code under one adapter name; cheaper than the full fingerprint (no attributes, no data)."""
    canon = _Canon()
    classes = sorted({_class_digest(type(m), canon) for m in module.modules()})
    layout = [[k, str(v.dtype), list(v.shape)] for k, v in module.state_dict().items()]
    loss_form = canon.value(loss, "the loss", strict=False) if not isinstance(loss, str) \
        else ["built-in", loss]
    return _sha(json.dumps([classes, layout, loss_form], separators=(",", ":")))[:16]


# --- which names are one tensor ------------------------------------------------------------
# Buffer names of BatchNorm layers, which tell buffers from parameters when no module is given.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` under every name it has (tied ones repeated)."""
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def aliases(tensors: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None
            ) -> dict[str, str]:
    """Name -> the first name of the same tensor object.

    Args:
        tensors: name -> tensor, as from :func:`named_tensors`.
        keys: the names to map, in order (default: every name of ``tensors``); the first of
            them that names a tensor is the one its other names map to. Names that ``tensors``
            does not hold are left out.
    """
    names = list(tensors) if keys is None else [k for k in keys if k in tensors]
    first: dict[int, str] = {}
    return {k: first.setdefault(id(tensors[k]), k) for k in names}


def tied(keys: Iterable[str], tensors: Mapping[str, torch.Tensor]) -> frozenset[str]:
    """Every name of the tensors that ``keys`` name (a tied tensor under all its names)."""
    ids = {id(tensors[k]) for k in keys if k in tensors}
    return frozenset(k for k, t in tensors.items() if id(t) in ids)


def unique(keys: Iterable[str], alias: Mapping[str, str]) -> list[str]:
    """``keys`` with one name per tensor: a later name of a tied tensor is dropped."""
    seen: set[str] = set()
    out = []
    for k in keys:
        ident = alias.get(k, k)
        if ident not in seen:
            seen.add(ident)
            out.append(k)
    return out


def state_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Name -> the first name whose tensor shares its storage (same memory, offset and shape):
    the tied tensors of a state dict taken from a module. An empty tensor is its own."""
    first: dict[tuple, str] = {}
    out = {}
    for k, v in state.items():
        place = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = first.setdefault(place, k) if v.numel() else k
    return out


def parameter_keys(state: Mapping[str, torch.Tensor], module: nn.Module | None = None) -> set[str]:
    """Return the keys of ``state`` that are parameters.

    With a module, its parameters under every name (a tied one under each; groups count each
    tensor once with :func:`unique_keys`). Without one, floating tensors whose names do not end
    in a BatchNorm buffer name, one key per storage (:func:`state_aliases`).
    """
    if module is not None:
        return {k for k, _ in module.named_parameters(remove_duplicate=False)} & set(state)
    candidates = {
        k: v for k, v in state.items()
        if v.is_floating_point() and k.rsplit(".", 1)[-1] not in BUFFER_SUFFIXES
    }
    alias = state_aliases(candidates)
    return {k for k in candidates if alias[k] == k}


def buffer_keys(state: Mapping[str, torch.Tensor], module: nn.Module | None = None) -> set[str]:
    """Return the keys of ``state`` that are buffers: the module's (under every name), or
    without one, non-float tensors and those named like BatchNorm's running statistics."""
    if module is not None:
        return {k for k, _ in module.named_buffers(remove_duplicate=False)} & set(state)
    return {
        k for k, v in state.items()
        if not v.is_floating_point() or k.rsplit(".", 1)[-1] in BUFFER_SUFFIXES
    }


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of floating tensors, in order (the ones that interpolate)."""
    return [k for k, v in state.items() if v.is_floating_point()]


def nonfloat_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of integer and bool tensors, in order (they never interpolate)."""
    return [k for k, v in state.items() if not v.is_floating_point()]


def unique_keys(
    keys: Iterable[str], params: set[str], module: nn.Module | None = None
) -> list[str]:
    """``keys`` that are in ``params``, one name per tensor (tied names after the first dropped,
    as the module ties them; without one, :func:`parameter_keys` already kept one per storage)."""
    alias = aliases(dict(module.named_parameters(remove_duplicate=False))) if module else {}
    return unique((k for k in keys if k in params), alias)
