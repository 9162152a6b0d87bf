"""Hugging Face ``transformers`` models, built offline from a model folder's ``config.json``.

A checkpoint folder written by ``save_pretrained`` (``config.json`` beside ``model.safetensors``
or its shards) is read by :mod:`ckptscope.shards`, which names this adapter for it with the
folder as ``model_dir``: no ``--adapter`` is needed. The model class is the one ``config.json``'s
``architectures`` field names, looked up in the ``transformers`` package only (never code from
the folder: ``auto_map`` / ``trust_remote_code`` models are refused), and built from the config
with ``local_files_only=True``: nothing is downloaded. The engine evaluates its ``logits``
(:func:`ckptscope.outputs.logits_of`) with ``cross_entropy``, whose ``-100`` targets are left
out: causal LMs on next-token windows (``--data tokens:FILE.npy``), masked LMs on targets that
are ``-100`` except at the masked positions, sequence classifiers on class labels.

``transformers`` is imported only when a model is built (``pip install -e '.[hf]'``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from ckptscope.adapters import ADAPTERS, Adapter
from ckptscope.errors import CkptscopeError

INSTALL = "pip install -e '.[hf]' (or pip install transformers)"
# A transformer's repeated blocks: GPT-2 ``transformer.h.N.``, Llama-style ``model.layers.N.``,
# BERT ``bert.encoder.layer.N.``, OPT ``model.decoder.layers.N.``, GPT-NeoX ``gpt_neox.layers.N.``.
_BLOCK = re.compile(r"^((?:.*\.)?(?:h|layers|layer|blocks))\.(\d+)\.")
_CONFIG_LIMIT = 4 << 20


def import_transformers():
    """The ``transformers`` module, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise CkptscopeError(
            f"the huggingface adapter needs transformers, which is not importable ({err}); "
            f"{INSTALL}."
        ) from None
    return transformers


def read_config(model_dir: str | os.PathLike) -> dict:
    """``config.json`` of a model folder as a dict.

    Raises:
        CkptscopeError: the file is missing, too large, or not a JSON object.
    """
    path = Path(model_dir) / "config.json"
    where = repr(str(path))
    if not path.is_file():
        raise CkptscopeError(
            f"{where} does not exist; the huggingface adapter builds the model from the "
            f"config.json that save_pretrained writes beside the weights (--adapter-opt "
            f"model_dir=FOLDER)."
        )
    if path.stat().st_size > _CONFIG_LIMIT:
        raise CkptscopeError(f"{where} is over {_CONFIG_LIMIT >> 20} MiB; not a model config.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CkptscopeError(
            f"{where} is not valid JSON ({str(err).splitlines()[0]}); save the model again."
        ) from None
    if not isinstance(config, dict):
        raise CkptscopeError(f"{where} holds a {type(config).__name__}, not a model config.")
    return config


def architecture_of(config: Mapping[str, object], *, source: str) -> str:
    """The one model class a config's ``architectures`` field names."""
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1
            and isinstance(architectures[0], str)):
        raise CkptscopeError(
            f"{source} names architectures {architectures!r}, not exactly one model class; pass "
            f"--adapter-opt model_dir=FOLDER --adapter-opt architecture=CLASS (e.g. "
            f"GPT2LMHeadModel)."
        )
    return architectures[0]


def model_class(name: str, *, source: str):
    """The ``transformers`` model class called ``name`` (a ``PreTrainedModel`` subclass)."""
    transformers = import_transformers()
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CkptscopeError(
            f"{source} names the architecture {name!r}, which is not a model class of "
            f"transformers {transformers.__version__}; ckptscope runs no code from a model "
            f"folder (no trust_remote_code): upgrade transformers, or pass your own "
            f"--adapter pkg.module:attr."
        )
    return cls


def drop_tied_aliases(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """A state-dict hook: leave out every name of a tied tensor but its first, as
    ``save_pretrained`` does (a GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``), so
    the module's keys are the saved file's. The tensor still sits under every name in the
    module; the engine moves it once (:func:`ckptscope.identity.aliases`)."""
    first: dict[int, str] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        if first.setdefault(id(tensor), name) != name:
            state.pop(prefix + name, None)


def build(model_dir: str, architecture: str | None = None,
          attn_implementation: str | None = None) -> nn.Module:
    """A ``transformers`` model for a ``save_pretrained`` folder, randomly initialised, in eval
    mode (the engine writes the checkpoints' weights into it).

    Args:
        model_dir: the folder holding ``config.json``.
        architecture: the model class, instead of ``config.json``'s ``architectures`` (e.g.
            ``GPT2LMHeadModel``); a class of the ``transformers`` package only.
        attn_implementation: ``eager``, ``sdpa``, ...; ``None``: transformers' default.
            ``eager`` is plain matrix products, which ``torch.vmap`` batches (``--strategy
            vmap``); the CPU's fused ``sdpa`` kernel has no batching rule yet and runs point
            by point there.
    """
    source = repr(str(Path(model_dir) / "config.json"))
    if architecture is None:
        config = read_config(model_dir)
        if "auto_map" in config:  # the folder's own modelling code, even under a stock name
            raise CkptscopeError(
                f"{source} has an auto_map entry: its model is code shipped in the folder "
                f"(trust_remote_code), which ckptscope never runs; pass your own --adapter "
                f"pkg.module:attr, or --adapter-opt architecture=CLASS to build a transformers "
                f"class instead."
            )
        architecture = architecture_of(config, source=source)
        cls = model_class(architecture, source=source)
    else:
        read_config(model_dir)
        cls = model_class(architecture, source="--adapter-opt architecture")
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # the config's own validation: the file's fault
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CkptscopeError(
            f"transformers cannot read {source} ({reason}); save the model again."
        ) from None
    if hasattr(config, "use_cache"):
        config.use_cache = False  # logits only: no key/value cache to build and return
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        module = cls._from_config(config, **extra)  # what AutoModel*.from_config does
    except (ValueError, ImportError) as err:  # an attention implementation it does not have
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CkptscopeError(f"cannot build {architecture} from {source} ({reason}).") from None
    module.eval()
    module._register_state_dict_hook(drop_tied_aliases)
    return module


def blocks(keys: Sequence[str]) -> dict[str, str]:
    """One group per transformer block, named by its key prefix: ``transformer.h.0`` ->
    ``transformer\\.h\\.0\\.`` (GPT-2), ``model.layers.N.`` (Llama-style), ``...encoder.layer.N.``
    (BERT, under any prefix)."""
    found: dict[str, str] = {}
    for key in keys:
        if (m := _BLOCK.match(key)) is not None:
            name = f"{m[1]}.{m[2]}"
            found.setdefault(name, re.escape(name) + r"\.")
    if not found:
        raise CkptscopeError(
            f"preset 'blocks': no key looks like a transformer block (PREFIX.h.N., "
            f"PREFIX.layers.N., PREFIX.layer.N.; keys start with {list(keys)[:5]}); give the "
            f"groups as regexes (--group 'transformer.h.0.')."
        )
    return found


ADAPTERS.register("huggingface")(Adapter(
    name="huggingface",
    build=build,
    presets={"blocks": blocks},
    description="a transformers model built offline from a save_pretrained folder's config.json",
))
