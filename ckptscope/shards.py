"""Checkpoints that are a folder or a set of shards: what ``save_pretrained`` and friends write.

A checkpoint path may be a directory holding

- ``model.safetensors.index.json`` and the shards it names (``model-00001-of-00003.safetensors``
  ...), or
- ``model.safetensors``, or
- ``pytorch_model.bin`` (read with ``weights_only=True``), or ``pytorch_model.bin.index.json``
  and its ``.bin`` shards;

or a ``*.safetensors.index.json`` / ``*.bin.index.json`` file itself. The index is validated
before a tensor is read: it must be JSON with a ``weight_map`` of key -> shard file name, every
shard must be a plain file name in the index's folder and present, and the shards must hold
exactly the keys the index gives them, no key in two shards.

A folder with a ``config.json`` is a Hugging Face model: :func:`model_folder_metadata` gives it
the ``huggingface`` adapter (a registry entry, :mod:`ckptscope.adapters.huggingface`), so it
needs no ``--adapter``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ckptscope.errors import CkptscopeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_FILE = "pytorch_model.bin"
CONFIG_FILE = "config.json"
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
_INDEX_LIMIT = 64 << 20  # an index of a few-billion-parameter model is well under 1 MiB

ReadFile = Callable[[Path], tuple[dict[str, torch.Tensor], dict[str, str], list[str]]]


def is_index(path: Path) -> bool:
    """Whether ``path`` names a shard index (``*.safetensors.index.json``, ``*.bin.index.json``)."""
    return path.name.endswith(INDEX_SUFFIXES)


def checkpoint_files(folder: Path) -> tuple[Path, bool]:
    """The file a checkpoint folder is read from, and whether it is a shard index.

    Raises:
        CkptscopeError: the folder holds none of the files a checkpoint folder holds.
    """
    for name, index in ((SAFETENSORS_INDEX, True), (SAFETENSORS_FILE, False),
                        (TORCH_INDEX, True), (TORCH_FILE, False)):
        if (folder / name).is_file():
            return folder / name, index
    found = sorted(p.name for p in folder.iterdir())[:8]
    raise CkptscopeError(
        f"checkpoint {str(folder)!r} is a directory that holds none of {SAFETENSORS_INDEX}, "
        f"{SAFETENSORS_FILE}, {TORCH_INDEX}, {TORCH_FILE} (it holds {found}); pass the "
        f"checkpoint file itself, or a folder written by save_pretrained."
    )


def read_index(path: Path) -> dict[str, list[str]]:
    """Shard file name -> the keys the index puts there, in the index's order.

    Raises:
        CkptscopeError: the index is not JSON, has no ``weight_map``, names a shard by a path
            (not a plain file name), or a shard that is missing.
    """
    where = repr(str(path))
    if path.stat().st_size > _INDEX_LIMIT:
        raise CkptscopeError(f"shard index {where} is over {_INDEX_LIMIT >> 20} MiB; it is not "
                             f"an index written by save_pretrained.")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CkptscopeError(
            f"shard index {where} is not valid JSON ({str(err).splitlines()[0]}); it may be "
            f"truncated: save the checkpoint again."
        ) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CkptscopeError(
            f"shard index {where} has no 'weight_map' of key -> shard file; it is not an index "
            f"written by save_pretrained."
        )
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (
                ".", ".."):
            raise CkptscopeError(
                f"shard index {where} puts {key!r} in {shard!r}, which is not a file name in "
                f"the index's folder; ckptscope reads shards beside their index only."
            )
        shards.setdefault(shard, []).append(str(key))
    missing = sorted(s for s in shards if not (path.parent / s).is_file())
    if missing:
        raise CkptscopeError(
            f"shard index {where} names {len(missing)} shard(s) that are not in "
            f"{str(path.parent)!r} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
            f"); copy every shard beside the index."
        )
    return shards


def read_shards(index: Path, read_file: ReadFile
                ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], list[Path]]:
    """Read every shard an index names and check it holds exactly the keys the index says.

    Args:
        index: the ``*.index.json`` file.
        read_file: reads one shard: ``read_file(path) -> (state, metadata, notes)``.

    Returns:
        The state (keys in the index's order), the first shard's ckptscope metadata, the notes,
        and the shard files in name order.

    Raises:
        CkptscopeError: a shard holds a key the index does not give it, lacks one it does, or
            a key is in two shards.
    """
    shards = read_index(index)
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    notes: list[str] = []
    where: dict[str, str] = {}
    for shard, keys in shards.items():
        part, meta, more = read_file(index.parent / shard)
        metadata = metadata or meta
        notes += [n for n in more if n not in notes]
        twice = sorted(k for k in part if k in where)
        if twice:
            raise CkptscopeError(
                f"{twice[0]!r} is in two shards of {str(index)!r} ({where[twice[0]]} and "
                f"{shard}); a key belongs to one shard: save the checkpoint again."
            )
        unlisted = sorted(set(part) - set(keys))
        absent = sorted(set(keys) - set(part))
        if unlisted or absent:
            problem = (f"holds {unlisted[0]!r}, which the index does not put there" if unlisted
                       else f"lacks {absent[0]!r}, which the index puts there")
            more_keys = len(unlisted) + len(absent) - 1
            raise CkptscopeError(
                f"shard {shard} of {str(index)!r} {problem}"
                f"{f' (and {more_keys} more key(s) differ)' if more_keys else ''}; the index "
                f"and its shards are from different saves: save the checkpoint again."
            )
        for key in part:
            where[key] = shard
        state.update(part)
    order = [k for keys in shards.values() for k in keys]
    return ({k: state[k] for k in order}, metadata, notes,
            sorted(index.parent / s for s in shards))


def shards_sha256(files: list[Path], file_sha256: Callable[[Path], str]) -> str:
    """A digest over shard files: the sha256 of the lines ``"<file sha256>  <file name>\\n"``,
    in name order, which is what ``sha256sum model-*.safetensors | sha256sum`` prints run in
    the folder (one file: that file's own sha256)."""
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{file_sha256(f)}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def model_folder_metadata(folder: Path) -> dict[str, str]:
    """The ckptscope metadata a Hugging Face model folder (one with ``config.json``) implies:
    the ``huggingface`` adapter, with the folder as its ``model_dir`` option. Empty for a folder
    without ``config.json``. Only the registry entry is named: what ``config.json`` says is read
    by the adapter, under its own rules."""
    if not (folder / CONFIG_FILE).is_file():
        return {}
    return {"adapter": "huggingface",
            "adapter_options": json.dumps({"model_dir": os.fspath(folder)})}
