"""Token data for language models: ``tokens:FILE`` (token ids) and ``text:FILE`` (plain text).

- ``tokens:FILE.npy``, a 2-D integer array ``(n, T + 1)`` of windows: inputs ``[:, :-1]``,
  targets ``[:, 1:]`` (next-token prediction at every position);
- ``tokens:FILE.npy,seq_len=T``, a 1-D integer stream cut into ``(stream_length - 1) // T``
  windows of ``T + 1`` tokens, each starting where the last one's inputs end;
- ``tokens:FILE.npz`` with arrays ``inputs`` and ``targets``, used as they are (a masked LM's
  targets are ``-100`` except at the masked positions; a classifier's are ``(n,)`` labels);
- ``text:FILE,seq_len=T`` (and ``,tokenizer=DIR``): UTF-8 text tokenised with the tokenizer
  saved in ``DIR`` (offline), then cut as a stream. ``DIR`` defaults to the start checkpoint
  when it is a model folder (:func:`with_tokenizer`).

Every set is one split, ``test``. Arrays are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ckptscope.data import DATASETS, Dataset, Split
from ckptscope.errors import CkptscopeError

IGNORE_INDEX = -100
_OPTIONS = ("seq_len", "tokenizer")


def parse_arg(arg: str | None, name: str) -> tuple[Path, dict[str, str]]:
    """``PATH[,seq_len=T][,tokenizer=DIR]`` -> (path, options)."""
    if not arg:
        raise CkptscopeError(f"dataset {name!r} needs a file: --data {name}:FILE.")
    parts = arg.split(",")
    # Options start at the first ",key=" (a key of letters and '_'): a path may hold commas.
    cut = next((i for i, p in enumerate(parts) if i and re.fullmatch(r"[a-z_]+=.*", p)),
               len(parts))
    options = {}
    for part in parts[cut:]:
        key, sep, value = part.partition("=")
        if not sep or key not in _OPTIONS or not value:
            known = ", ".join(k + "=..." for k in _OPTIONS)
            raise CkptscopeError(f"dataset {name!r}: {part!r} is not one of {known}.")
        options[key] = value
    return Path(",".join(parts[:cut])), options


def _seq_len(options: dict[str, str], name: str) -> int | None:
    value = options.get("seq_len")
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise CkptscopeError(f"dataset {name!r}: seq_len={value!r} is not a positive integer.")
    return int(value)


def windows(stream: np.ndarray, seq_len: int, *, source: str) -> Split:
    """A 1-D token stream cut into next-token windows: inputs and targets ``(n, seq_len)``."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise CkptscopeError(
            f"{source} holds {len(stream)} tokens, fewer than one window of seq_len={seq_len} "
            f"plus the next token; give more text or a smaller --seq-len."
        )
    ids = torch.as_tensor(np.ascontiguousarray(stream[: n * seq_len + 1]), dtype=torch.long)
    inputs = ids[:-1].reshape(n, seq_len)
    targets = ids[1:].reshape(n, seq_len)
    return inputs, targets


def _ints(array: np.ndarray, what: str, *, source: str, ignore: bool = False) -> np.ndarray:
    if array.dtype.kind not in "iu":
        raise CkptscopeError(
            f"{source}: {what} are {array.dtype}, not integer token ids; save them as int32 or "
            f"int64."
        )
    bad = array < 0
    if ignore:
        bad &= array != IGNORE_INDEX
    if bad.any():
        raise CkptscopeError(
            f"{source}: {what} hold {int(array[bad].flat[0])}; token ids are >= 0"
            f"{' (or -100, left out of the loss)' if ignore else ''}."
        )
    return array


def _load_array(path: Path, source: str):
    if not path.is_file():
        raise CkptscopeError(f"{source}: {str(path)!r} does not exist; check the path.")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise CkptscopeError(
            f"{source}: {str(path)!r} is not a readable .npy/.npz file ({reason}); save it "
            f"with numpy.save or numpy.savez."
        ) from None


def load_tokens(arg: str | None, *, seed: int = 0) -> dict[str, Split]:
    """``tokens:FILE`` (see the module docstring): ``{"test": (inputs, targets)}``."""
    path, options = parse_arg(arg, "tokens")
    source = f"tokens:{path}"
    seq_len = _seq_len(options, "tokens")
    loaded = _load_array(path, source)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            missing = [k for k in ("inputs", "targets") if k not in loaded.files]
            if missing:
                raise CkptscopeError(
                    f"{source} has arrays {sorted(loaded.files)}, not 'inputs' and 'targets'; "
                    f"save it with numpy.savez(FILE, inputs=..., targets=...)."
                )
            x = _ints(loaded["inputs"], "inputs", source=source)
            y = _ints(loaded["targets"], "targets", source=source, ignore=True)
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y) or len(x) == 0:
            raise CkptscopeError(
                f"{source}: inputs of shape {x.shape} and targets of shape {y.shape}; give as "
                f"many of each (n >= 1)."
            )
        _no_seq_len(seq_len, x.shape, source)
        return {"test": (torch.as_tensor(x, dtype=torch.long),
                         torch.as_tensor(y, dtype=torch.long))}
    array = _ints(loaded, "token ids", source=source)
    if array.ndim == 1:
        if seq_len is None:
            raise CkptscopeError(
                f"{source} is a 1-D stream of {len(array)} tokens; say how long a window is: "
                f"--seq-len T (Python: 'tokens:{path},seq_len=T')."
            )
        return {"test": windows(array, seq_len, source=source)}
    if array.ndim != 2 or array.shape[1] < 2 or array.shape[0] == 0:
        raise CkptscopeError(
            f"{source} has shape {array.shape}; give windows (n, T + 1) with T >= 1, or a 1-D "
            f"stream with --seq-len."
        )
    _no_seq_len(seq_len, (array.shape[0], array.shape[1] - 1), source)
    ids = torch.as_tensor(array, dtype=torch.long)
    return {"test": (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())}


def _no_seq_len(seq_len: int | None, shape: tuple[int, ...], source: str) -> None:
    """Refuse a window length that differs from the one windows already saved have (it would
    be ignored: only a 1-D stream is cut)."""
    if seq_len is not None and (len(shape) < 2 or seq_len != shape[1]):
        raise CkptscopeError(
            f"{source} holds windows of shape {tuple(shape)} already, so seq_len={seq_len} "
            f"(--seq-len) cannot apply; leave it out, or save a 1-D token stream to cut."
        )


def load_text(arg: str | None, *, seed: int = 0) -> dict[str, Split]:
    """``text:FILE,seq_len=T[,tokenizer=DIR]``: ``{"test": (inputs, targets)}``."""
    path, options = parse_arg(arg, "text")
    source = f"text:{path}"
    seq_len = _seq_len(options, "text")
    folder = options.get("tokenizer")
    if folder is None:
        raise CkptscopeError(
            f"{source}: no tokenizer; the start checkpoint is not a model folder, so name one: "
            f"--data 'text:{path},tokenizer=DIR'."
        )
    if seq_len is None:
        raise CkptscopeError(
            f"{source}: say how many tokens a window holds: --seq-len T (Python: "
            f"'text:{path},seq_len=T')."
        )
    if not path.is_file():
        raise CkptscopeError(f"{source}: {str(path)!r} does not exist; check the path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CkptscopeError(f"{source} is not UTF-8 text ({err.reason} at byte {err.start}).") \
            from None
    stream = np.asarray(tokenizer(folder)(text, add_special_tokens=False)["input_ids"],
                        dtype=np.int64)
    return {"test": windows(stream, seq_len, source=source)}


# What a tokenizer's save_pretrained leaves in a folder (one of them at least). Without any,
# transformers builds an empty tokenizer from config.json alone, which maps all text to
# nothing or to the unknown token: refused before it is built.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in ``folder`` (``save_pretrained``'s files), loaded offline."""
    from ckptscope.adapters.huggingface import import_transformers

    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise CkptscopeError(
            f"no tokenizer is saved in {str(folder)!r} (none of {', '.join(TOKENIZER_FILES)}); "
            f"save one there with tokenizer.save_pretrained(FOLDER), or name another: "
            f"'text:FILE,tokenizer=DIR'."
        )
    transformers = import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # missing or unreadable files: the folder's, said in one line
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CkptscopeError(
            f"no tokenizer can be loaded from {str(folder)!r} ({reason}); save one there with "
            f"tokenizer.save_pretrained(FOLDER), or name another: 'text:FILE,tokenizer=DIR'."
        ) from None


def with_tokenizer(spec: object, checkpoint_path: str) -> object:
    """``text:FILE...`` naming no tokenizer gets the start checkpoint's folder as its
    tokenizer when that is a model folder (``config.json`` inside); other specs pass through."""
    if not (isinstance(spec, str) and spec.startswith("text:")) or ",tokenizer=" in spec:
        return spec
    if checkpoint_path and (Path(checkpoint_path) / "config.json").is_file():
        return f"{spec},tokenizer={checkpoint_path}"
    return spec


def with_seq_len(spec: str | None, seq_len: int | None) -> str | None:
    """The CLI's ``--seq-len T`` added to a ``tokens:`` or ``text:`` spec as ``,seq_len=T``."""
    if seq_len is None:
        return spec
    if not (isinstance(spec, str) and spec.partition(":")[0] in ("tokens", "text")):
        raise CkptscopeError("--seq-len applies to --data tokens:FILE or text:FILE only.")
    if ",seq_len=" in spec:
        raise CkptscopeError(f"give the window length once: --seq-len or {spec!r}, not both.")
    return f"{spec},seq_len={seq_len}"


DATASETS.register("tokens")(Dataset(
    name="tokens", load=load_tokens,
    description="token ids from FILE.npy (windows, or a stream with seq_len) or FILE.npz",
))
DATASETS.register("text")(Dataset(
    name="text", load=load_text,
    description="UTF-8 text tokenised with a model folder's tokenizer, cut into seq_len windows",
))
