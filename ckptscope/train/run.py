"""``run(recipe, seed=, out=)``: train one recipe for one seed into a run directory.

A run directory holds::

    init.safetensors      theta_i, before the first step (after any intervention)
    final.safetensors     theta_f; written last, so its presence marks a finished run
    epoch_XXX.safetensors every ``save_every`` epochs (optional)
    metrics.jsonl         one JSON line per epoch: lr, train/test loss and accuracy, seconds
    train.log             one readable line per epoch
    resume.pt             optimizer, RNG states and weights at the last epoch boundary, for
                          ``resume=True``; removed when the run finishes

Every safetensors file carries metadata (recipe, resolved config, seed, adapter, adapter options,
data spec, versions, epoch), so ``ckptscope path init.safetensors final.safetensors`` needs no
flags. Files are written to a temporary name and renamed; log lines are appended whole, and a
torn last line (a kill mid-write) is dropped on resume.

The seed fixes the initialisation (the global torch RNG), the data order and the augmentations
(their own CPU generators), and the random labels: the same seed on the same device and thread
count gives a bitwise identical theta_f, resumed or not.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckptscope.adapters import get_adapter
from ckptscope.checkpoints import save_checkpoint
from ckptscope.data import load_data
from ckptscope.data.transforms import subset
from ckptscope.engine.placement import CHANNELS_LAST_MIN_BATCH, resolve_device, set_layout
from ckptscope.errors import CkptscopeError
from ckptscope.files import replacing, write_text
from ckptscope.losses import get_loss, target_dtype
from ckptscope.train.interventions import initial_state
from ckptscope.train.loop import (
    Augmentation,
    evaluate,
    lr_factor,
    make_optimizer,
    set_lr,
    train_epoch,
)
from ckptscope.train.recipe import Recipe
from ckptscope.train.spawn import is_save_epoch, save_spawn_state, spawn_state, state_path

FILE_DATASETS = ("cifar10", "cifar100", "mnist")
INIT, FINAL, METRICS, LOG, RESUME = (
    "init.safetensors", "final.safetensors", "metrics.jsonl", "train.log", "resume.pt")


@dataclass(frozen=True)
class RunOutput:
    """What a run wrote and reached."""

    out: Path
    init: Path
    final: Path
    history: list[dict]
    images_per_second: float = float("nan")
    notes: dict = field(default_factory=dict)
    skipped: bool = False  # already finished before this call

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def stream_seed(seed: int, name: str) -> int:
    """A seed for the named random stream of run ``seed`` (order, augment, labels, ...)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def data_spec(recipe: Recipe, data_dir: str | os.PathLike | None) -> str:
    """The dataset spec a run trains on: the recipe's, completed by ``data_dir``."""
    name, sep, _ = recipe.data.partition(":")
    if data_dir is not None:
        if sep:
            raise CkptscopeError(
                f"recipe {recipe.name!r} names its data fully ({recipe.data!r}); drop --data or "
                f"--set data={name}."
            )
        return f"{recipe.data}:{data_dir}"
    if name in FILE_DATASETS and not sep:
        raise CkptscopeError(
            f"recipe {recipe.name!r} trains on {name}: pass --data DIR, the directory holding "
            f"the extracted {name} files (ckptscope downloads nothing)."
        )
    return recipe.data


# --- atomic files ------------------------------------------------------------------------------
def _layout(module: torch.nn.Module, x: torch.Tensor, dev: torch.device, recipe: Recipe,
            asked: bool | None, stored: bool | None) -> torch.memory_format:
    """The memory layout to train in: the resumed run's (``stored``), else as ``asked``, else
    channels-last for a conv net on image data on CUDA, and on the CPU in batches of at least
    the evaluator's threshold (one thread, batch 128: a ResNet-18 step 13-27% faster, VGG-11-BN
    11-20%). A forward pass on two examples checks it first; a model that cannot run in it (a
    ``.view`` of a conv output, say) keeps the default layout, or, when it was asked for, gets
    a one-line error."""
    if stored is not None and asked is not None and asked != stored:
        raise CkptscopeError(
            f"this run was trained with channels_last={stored}; resume it with the same "
            f"setting (or leave it out)."
        )
    conv = any(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    want = next((v for v in (stored, asked) if v is not None), None)
    if want is None:
        want = conv and (dev.type == "cuda" or recipe.batch_size >= CHANNELS_LAST_MIN_BATCH)
    if not want or x.dim() != 4:
        return torch.contiguous_format
    if (err := _forward_error(module, x[:2], torch.channels_last)) is None:
        return torch.channels_last
    # Asked for, and the model runs in the default layout: the layout is what fails.
    if asked and _forward_error(module, x[:2], torch.contiguous_format) is None:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CkptscopeError(
            f"channels_last=True was asked for, but the model fails in channels-last layout "
            f"({reason}); use channels_last=False or None."
        )
    return torch.contiguous_format


def _forward_error(module: torch.nn.Module, x: torch.Tensor,
                   layout: torch.memory_format) -> Exception | None:
    """The error of a forward pass on ``x`` with the module in ``layout``, if it fails. In eval
    mode and without gradients, so that it moves no BatchNorm statistics and draws nothing from
    the random generators; the module is left in the default layout, in its own mode."""
    tensors = [*module.parameters(), *module.buffers()]
    training = module.training
    module.eval()
    try:
        set_layout(tensors, layout)
        with torch.no_grad():
            module(x.contiguous(memory_format=layout))
    except Exception as err:  # anything: a model that fails here keeps the default layout
        return err
    finally:
        set_layout(tensors, torch.contiguous_format)
        module.train(training)
    return None


def _atomic_torch_save(obj: object, path: Path) -> None:
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def _append_line(path: Path, line: str) -> None:
    """Append one whole line with a single write (a kill can only tear the last line)."""
    with open(path, "a") as f:
        f.write(line + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The complete records of a ``metrics.jsonl`` (a torn last line is left out)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().split("\n"):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_log(path: Path, epoch: int, *, jsonl: bool) -> list[dict]:
    """Keep the lines of epochs <= ``epoch`` (atomically); return the JSON records kept."""
    if not path.is_file():
        return []
    kept, records = [], []
    for line in path.read_text().split("\n"):
        if not line:
            continue
        if jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("epoch", 0) > epoch:
                continue
            records.append(record)
        elif not line.startswith("epoch ") or int(line.split()[1].split("/")[0]) > epoch:
            continue
        kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))
    return records


def recipe_changes(recorded: object, recipe: Recipe) -> list[str]:
    """``field: recorded -> now`` for each recipe field that differs from a run's recorded
    config (a JSON object, or its text as the checkpoint metadata holds it)."""
    if isinstance(recorded, str):
        try:
            recorded = json.loads(recorded)
        except ValueError:
            recorded = None
    if not isinstance(recorded, dict):
        return ["config: unreadable in the run's files"]
    now = json.loads(json.dumps(recipe.to_dict()))  # the same JSON types as the record
    return [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k)]


def _check_finished_matches(out: Path, recipe: Recipe, seed: int) -> None:
    """Refuse to hand back a finished run that was trained with another recipe or seed: a
    sweep with ``--set lr=0.5`` over a folder trained with another lr would return the old
    run as if it were the new one. A run from before configs were recorded is accepted."""
    from ckptscope.checkpoints import load_checkpoint

    meta = load_checkpoint(out / FINAL).metadata
    if "config" not in meta:
        return
    changes = recipe_changes(meta["config"], recipe)
    if str(meta.get("seed", seed)) != str(seed):
        changes.insert(0, f"seed: {meta.get('seed')} -> {seed}")
    if changes:
        raise CkptscopeError(
            f"{out} holds a run finished with another recipe ({'; '.join(changes[:4])}"
            f"{'; ...' if len(changes) > 4 else ''}); choose another --out, or delete {out} to "
            f"train it again."
        )


def _versions() -> dict:
    from ckptscope import __version__

    return {"ckptscope": __version__, "torch": torch.__version__}


# --- the run -----------------------------------------------------------------------------------
def run(
    recipe: Recipe,
    *,
    seed: int = 0,
    out: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
    amp: bool = False,
    compile: bool = False,
    channels_last: bool | None = None,
    save_every: int | Collection[int] = 0,
    checkpoint_every: int = 1,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int, float, float], None] | None = None,
    spawn_from: str | os.PathLike | None = None,
) -> RunOutput:
    """Train ``recipe`` with ``seed`` into the folder ``out``; return what it wrote.

    Args:
        recipe: what to train (:func:`ckptscope.train.load_recipe`).
        seed: fixes the init, the data order, the augmentations and any random labels.
        out: the run directory (created).
        data_dir: completes a file-based dataset (``cifar10`` -> ``cifar10:DIR``).
        device: ``cpu``, ``cuda[:i]`` or ``auto``.
        amp: bf16 autocast for forward passes.
        compile: ``torch.compile`` the module for training.
        channels_last: a conv net and its image batches in channels-last layout (default: on
            CUDA, and on the CPU in batches of 32 or more; a resumed run keeps its own).
        save_every: also write ``epoch_XXX.safetensors`` (and the spawn state
            ``epoch_XXX.state.pt``) every this many epochs (0: never), or at the listed epochs.
        checkpoint_every: write the resume state every this many epochs (>= 1).
        resume: continue from ``resume.pt``; a finished run is returned as it is.
        on_epoch: called with each epoch's metrics record (and random-label pre-training's).
        on_step: called as ``on_step(step, steps, running_loss, running_accuracy)``.
        spawn_from: a parent run's ``init``/``epoch_XXX.safetensors``: continue from that state
            with this seed's data order (:mod:`ckptscope.train.spawn`).

    Raises:
        CkptscopeError: ``out`` holds another run (without ``resume``), a field in
            ``recipe.needs`` is empty, or the data, device or interventions are unusable.
    """
    out = Path(out)
    missing = recipe.missing_needs()
    if missing:
        raise CkptscopeError(
            f"recipe {recipe.name!r} needs {', '.join(missing)}: pass --set {missing[0]}=... "
            f"(see `ckptscope train --show {recipe.name}`)."
        )
    if checkpoint_every < 1 or (isinstance(save_every, int) and save_every < 0):
        raise CkptscopeError("checkpoint_every must be >= 1 and save_every >= 0.")
    dev = resolve_device(device)
    if (out / FINAL).is_file():
        if resume:
            _check_finished_matches(out, recipe, seed)
            return RunOutput(out, out / INIT, out / FINAL, read_metrics(out / METRICS),
                             skipped=True)
        raise CkptscopeError(f"{out} holds a finished run; choose another --out or delete it.")
    if not resume and any((out / name).exists() for name in (INIT, RESUME, METRICS)):
        raise CkptscopeError(
            f"{out} holds an unfinished run; continue it with --resume, or choose another --out."
        )
    out.mkdir(parents=True, exist_ok=True)

    spec = data_spec(recipe, data_dir)
    splits = load_data(spec, seed=recipe.data_seed)
    if "train" not in splits:
        raise CkptscopeError(f"data {spec!r} has no 'train' split (it has {sorted(splits)}).")
    if recipe.train_examples:
        splits = {**splits, "train": subset({"train": splits["train"]}, recipe.train_examples,
                                            seed=recipe.data_seed)["train"]}
    adapter = get_adapter(recipe.adapter)
    options = dict(recipe.adapter_options)
    loss = adapter.loss(options)
    loss_fn = get_loss(loss)
    tdtype = target_dtype(loss)
    image = splits["train"][0].dim() == 4
    if recipe.augment and not image:
        raise CkptscopeError(
            f"recipe {recipe.name!r}: augment={recipe.augment} needs image data, and {spec} is "
            f"not; --set augment=[]."
        )

    torch.manual_seed(seed)  # PyTorch's default init draws from the global RNG
    module = adapter.make(options)
    labels_gen = torch.Generator().manual_seed(stream_seed(seed, "labels"))
    metadata = {
        "recipe": recipe.name,
        "config": json.dumps(recipe.to_dict(), sort_keys=True),
        "seed": seed,
        "adapter": adapter.name,
        "adapter_options": options,
        "data": spec,
        "data_seed": recipe.data_seed,
        "train_examples": len(splits["train"][0]),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "amp": amp,
        "versions": _versions(),
    }

    resume_state = None
    if resume and (out / RESUME).is_file():
        resume_state = torch.load(out / RESUME, map_location="cpu", weights_only=True)
        if resume_state.get("seed") != seed or resume_state.get("recipe") != metadata["config"]:
            changes = recipe_changes(resume_state.get("recipe"), recipe)
            if resume_state.get("seed") != seed:
                changes.insert(0, f"seed: {resume_state.get('seed')!r} -> {seed}")
            raise CkptscopeError(
                f"{out / RESUME} was written with another seed or recipe "
                f"({'; '.join(changes[:4])}); resume with the same --recipe, --seed and --set, "
                f"or choose another --out."
            )
    elif spawn_from is not None:  # a child: the parent's state at epoch K, this seed's streams
        resume_state = spawn_state(spawn_from, recipe, seed=seed, out=out)
    # Before anything is written. A resumed run keeps the layout it was trained in (one from
    # before the layout was recorded: channels-last for image data on CUDA, as it was then).
    stored = None if resume_state is None else resume_state.get(
        "channels_last", image and dev.type == "cuda")
    memory_format = _layout(module, splits["train"][0], dev, recipe, channels_last, stored)
    metadata["channels_last"] = memory_format is torch.channels_last
    notes: dict = {}
    if resume_state is None:
        for stale in (METRICS, LOG):
            (out / stale).unlink(missing_ok=True)
        _, notes = initial_state(
            module, recipe, splits=splits, loss_fn=loss_fn, binary=tdtype is torch.float32,
            generator=labels_gen, device=dev, on_epoch=on_epoch)
        save_checkpoint(out / INIT, module.state_dict(),
                        metadata={**metadata, "epoch": 0, "role": "init", "init": notes})
        start_epoch = 0
    else:
        start_epoch = int(resume_state["epoch"])
        module.load_state_dict(resume_state["model"])
        notes = json.loads(resume_state.get("notes", "{}"))
        if spawn_from is not None and not (out / INIT).is_file():
            save_checkpoint(out / INIT, module.state_dict(), metadata={
                **metadata, "epoch": start_epoch, "role": "init", "init": notes})
    module.to(dev)
    set_layout([*module.parameters(), *module.buffers()], memory_format)

    x, y = (t.to(dev) for t in splits["train"])
    y = y.to(tdtype) if tdtype is not None else y
    test = splits.get("test")
    if test is not None:
        test = (test[0].to(dev), test[1].to(dev).to(tdtype) if tdtype else test[1].to(dev))
    normalization = _normalization(spec)
    augment = Augmentation(tuple(recipe.augment), recipe.crop_padding, recipe.brightness,
                           normalization)
    optimizer = make_optimizer(module, optimizer=recipe.optimizer, lr=recipe.lr,
                               weight_decay=recipe.weight_decay, momentum=recipe.momentum,
                               param_groups=recipe.param_groups)
    order_gen = torch.Generator().manual_seed(stream_seed(seed, "order"))
    augment_gen = torch.Generator().manual_seed(stream_seed(seed, "augment"))
    history: list[dict] = []
    if resume_state is not None:
        if resume_state["optimizer"] is not None:  # None: spawned from an init
            optimizer.load_state_dict(resume_state["optimizer"])
        order_gen.set_state(resume_state["rng_order"])
        augment_gen.set_state(resume_state["rng_augment"])
        torch.set_rng_state(resume_state["rng_global"])
        if dev.type == "cuda" and "rng_cuda" in resume_state:
            torch.cuda.set_rng_state(resume_state["rng_cuda"], dev)
        history = _truncate_log(out / METRICS, start_epoch, jsonl=True)
        _truncate_log(out / LOG, start_epoch, jsonl=False)

    step_module = torch.compile(module) if compile else module
    images, train_seconds = 0, 0.0
    for epoch in range(start_epoch + 1, recipe.epochs + 1):
        factor = lr_factor(epoch, milestones=recipe.lr_milestones, gamma=recipe.lr_gamma)
        set_lr(optimizer, factor)
        stats = train_epoch(step_module, x, y, optimizer=optimizer, loss_fn=loss_fn,
                            batch_size=recipe.batch_size, order=order_gen, augment=augment,
                            augment_generator=augment_gen, max_steps=recipe.steps_per_epoch,
                            amp=amp, memory_format=memory_format, on_step=on_step)
        images += stats.examples
        train_seconds += stats.seconds
        record = {"epoch": epoch, "lr": recipe.lr * factor}
        if recipe.eval_train:
            record["train_loss"], record["train_accuracy"] = evaluate(
                module, x, y, loss_fn=loss_fn, batch_size=recipe.eval_batch_size, amp=amp,
                memory_format=memory_format)
        else:
            record["train_loss"], record["train_accuracy"] = stats.loss, stats.accuracy
        if test is not None:
            record["test_loss"], record["test_accuracy"] = evaluate(
                module, *test, loss_fn=loss_fn, batch_size=recipe.eval_batch_size, amp=amp,
                memory_format=memory_format)
        record["seconds"] = round(stats.seconds, 4)
        record["images_per_second"] = round(stats.examples / max(stats.seconds, 1e-9), 1)
        history.append(record)
        _append_line(out / METRICS, json.dumps(record))
        _append_line(out / LOG, format_record(record, recipe.epochs))
        if is_save_epoch(epoch, save_every) and epoch != recipe.epochs:
            path = save_checkpoint(out / f"epoch_{epoch:03d}.safetensors", module.state_dict(),
                                   metadata={**metadata, "epoch": epoch, "role": "epoch"})
            save_spawn_state(state_path(path), optimizer, order_gen, augment_gen, dev,
                             epoch=epoch, seed=seed, config=metadata["config"], notes=notes,
                             channels_last=metadata["channels_last"])
        if epoch % checkpoint_every == 0 and epoch != recipe.epochs:
            _save_resume(out / RESUME, module, optimizer, order_gen, augment_gen, dev,
                         epoch=epoch, seed=seed, config=metadata["config"], notes=notes,
                         channels_last=metadata["channels_last"])
        if on_epoch:
            on_epoch(record)
    rate = images / train_seconds if train_seconds else float("nan")
    final_meta = {**metadata, "epoch": recipe.epochs, "role": "final", "init": notes,
                  "images_per_second": round(rate, 1) if rate == rate else None}
    if history:
        final_meta["final_metrics"] = history[-1]
    final = save_checkpoint(out / FINAL, module.state_dict(), metadata=final_meta)
    (out / RESUME).unlink(missing_ok=True)
    return RunOutput(out, out / INIT, final, history, rate, notes)


def _save_resume(path: Path, module, optimizer, order_gen, augment_gen, dev, *, epoch: int,
                 seed: int, config: str, notes: dict, channels_last: bool) -> None:
    """The resume state: plain tensors, numbers and strings only (loads with weights_only)."""
    state = {
        "epoch": epoch,
        "seed": seed,
        "recipe": config,
        "notes": json.dumps(notes),
        "channels_last": channels_last,
        "model": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng_order": order_gen.get_state(),
        "rng_augment": augment_gen.get_state(),
        "rng_global": torch.get_rng_state(),
    }
    if dev.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(dev)
    _atomic_torch_save(state, path)


def _normalization(spec: str) -> tuple | None:
    """The (mean, std) a file-based image set was normalised with, for brightness jitter."""
    name = spec.partition(":")[0]
    if name in ("cifar10", "cifar100"):
        from ckptscope.data.cifar import CIFAR10, CIFAR100

        info = CIFAR10 if name == "cifar10" else CIFAR100
        return info.mean, info.std
    return None


def format_record(record: dict, epochs: int) -> str:
    """One readable line for an epoch's record."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"lr {record['lr']:.3g}",
             f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}"]
    if "test_loss" in record:
        parts.append(f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}")
    parts.append(f"{record['seconds']:.1f}s {record['images_per_second']:.0f} img/s")
    return "  ".join(parts)
