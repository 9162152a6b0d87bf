"""Click commands of the trainer: ``train``, ``sweep``, ``reproduce`` (registered by the main
CLI with ``cli.add_command``). Each parses, makes one library call, writes and prints.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from ckptscope.errors import CkptscopeError
from ckptscope.files import replacing, write_text


class EpochBar:
    """Training progress on stderr (``rich``): one bar per run over its epochs, with the rate,
    the time left and the latest step's or epoch's numbers; silent off a terminal.

    Attributes:
        label: put before the epoch count; a new label (the sweep's ``seed 3: ``) starts a new
            bar below the finished ones.
    """

    def __init__(self, epochs: int, *, label: str = "", enabled: bool | None = None):
        from rich.progress import TextColumn

        from ckptscope.cli.output import progress_columns, stderr_progress

        self.epochs, self.label = epochs, label
        self.epoch = 0
        self.progress = stderr_progress(*progress_columns(), TextColumn("{task.fields[detail]}"),
                                        enabled=enabled)
        self.task, self._task_label = None, None

    def _show(self, detail: str) -> None:
        if self.progress is None:
            return
        if self.task is None or self._task_label != self.label:
            if self.task is None:
                self.progress.start()
            self.task = self.progress.add_task(self.label.strip() or "training",
                                               total=self.epochs, detail="")
            self._task_label = self.label
        self.progress.update(self.task, completed=self.epoch, detail=detail, refresh=True)

    def step(self, step: int, steps: int, loss: float, accuracy: float) -> None:
        self._show(f"epoch {self.epoch + 1}: step {step}/{steps} loss {loss:.4f} "
                   f"acc {accuracy:.4f}")

    def end_epoch(self, record: dict) -> None:
        if "phase" in record:  # random-label pre-training
            self._show(f"random labels epoch {record['epoch']}: acc {record['accuracy']:.4f}")
            return
        self.epoch = record["epoch"]
        detail = f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}"
        if "test_loss" in record:
            detail += f"  test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
        self._show(detail)

    def close(self) -> None:
        """Stop drawing; the bars stay on screen. Safe to call twice."""
        if self.progress is not None and self.task is not None:
            self.progress.stop()
        self.progress = None


def _per_run(bar, prefix):
    """An ``on_epoch(run, record)`` that advances ``bar``, naming each run (a seed, a child)
    by ``prefix(run)`` when its first epoch ends."""
    current = {"run": None}

    def on_epoch(run, record) -> None:
        if current["run"] != run:
            current["run"], bar.label = run, prefix(run)
        bar.end_epoch(record)

    return on_epoch


def _recipe(name: str, sets: tuple[str, ...]):
    from ckptscope.train.recipe import load_recipe, override, parse_assignments

    return override(load_recipe(name), parse_assignments(sets))


def _save_figure(fig, path: Path) -> None:
    with replacing(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=120)


def _run_line(label: str, result) -> str:
    """``2/1: trained to epoch 30, acc 0.9712`` for a run of an instability analysis."""
    if result.skipped:
        return f"{label}: already finished in {result.out}"
    acc = result.last.get("test_accuracy", result.last.get("train_accuracy", float("nan")))
    return f"{label}: trained to epoch {result.last.get('epoch', 0)}, acc {acc:.4f}"


def _summary_line(name: str, seed: int, result) -> str:
    last = result.last
    if result.skipped:
        return f"{name} seed {seed}: already finished in {result.out}"
    parts = [f"{name} seed {seed}: {last.get('epoch', 0)} epochs"]
    if "test_accuracy" in last:
        parts.append(f"test acc {last['test_accuracy']:.4f} loss {last['test_loss']:.4f}")
    parts.append(f"train acc {last.get('train_accuracy', float('nan')):.4f}")
    parts.append(f"{result.images_per_second:,.0f} images/s")
    return ", ".join(parts)


_SET = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                    help="Override a recipe field (TOML/JSON literal); repeatable.")
_DATA = click.option("--data", "data_dir", default=None, metavar="DIR",
                     help="Directory of a file-based dataset (cifar10 -> cifar10:DIR).")
_DEVICE = click.option("--device", default="auto", show_default=True,
                       help="auto, cpu or cuda[:i].")


@click.command()
@click.option("--recipe", "recipe_name", default=None, metavar="NAME|FILE.toml",
              help="A recipe (`--list` shows them).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fixes the init, data order and augmentation.")
@_SET
@_DATA
@_DEVICE
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory.")
@click.option("--save-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also write epoch_XXX.safetensors every K epochs.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Write the resume state every K epochs.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--amp", is_flag=True, help="bf16 autocast.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Conv nets in channels-last layout (default: where it is faster).")
@click.option("--list", "list_", is_flag=True, help="List the recipes and exit.")
@click.option("--show", default=None, metavar="NAME", help="Print a resolved recipe and exit.")
@click.option("--spawn-from", default=None, type=click.Path(dir_okay=False),
              metavar="RUN/epoch_K.safetensors",
              help="Continue a parent run from epoch K (model, optimizer, schedule) with this "
                   "--seed's data order.")
def train(recipe_name, seed, sets, data_dir, device, out, save_every, checkpoint_every, resume,
          amp, compile_, channels_last, list_, show, spawn_from):
    """Train a recipe: DIR/init.safetensors, final.safetensors, metrics.jsonl."""
    from ckptscope.train.recipe import load_recipe, recipe_names
    from ckptscope.train.run import run

    if list_:
        names = recipe_names()
        width = max(map(len, names))
        for name in names:
            click.echo(f"{name.ljust(width)}  {load_recipe(name).description}")
        return
    if show:
        click.echo(_recipe(show, sets).to_toml(), nl=False)
        return
    if recipe_name is None or out is None:
        raise CkptscopeError("give --recipe NAME and --out DIR (or --list / --show NAME).")
    recipe = _recipe(recipe_name, sets)
    bar = EpochBar(recipe.epochs)
    try:
        result = run(recipe, seed=seed, out=out, data_dir=data_dir, device=device, amp=amp,
                     compile=compile_, channels_last=channels_last, save_every=save_every,
                     checkpoint_every=checkpoint_every, resume=resume, on_epoch=bar.end_epoch,
                     on_step=bar.step, spawn_from=spawn_from)
    finally:
        bar.close()
    click.echo(_summary_line(recipe.name, seed, result))
    click.echo(f"wrote {result.init}, {result.final}, {Path(out) / 'metrics.jsonl'}")


@click.command()
@click.option("--recipe", "recipe_name", required=True, metavar="NAME|FILE.toml")
@click.option("--seeds", default="0-9", show_default=True, help="e.g. 0-9, 0,3,5.")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@_SET
@_DATA
@_DEVICE
@click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX",
              help="A group to evaluate; repeatable.")
@click.option("--preset", "presets", multiple=True, metavar="NAME",
              help="The adapter's group preset (blocks, layers, ...); repeatable.")
@click.option("--alphas", type=click.IntRange(min=2), default=51, show_default=True)
@click.option("--amp", is_flag=True, help="bf16 autocast for training.")
@click.option("--plot", is_flag=True, help="Also write DIR/result.png.")
def sweep(recipe_name, seeds, out, sets, data_dir, device, groups, presets, alphas, amp, plot):
    """Train a recipe for several seeds (skipping finished runs) and evaluate their paths."""
    from ckptscope.shape import summary
    from ckptscope.train.sweep import parse_seeds
    from ckptscope.train.sweep import sweep as run_sweep

    recipe = _recipe(recipe_name, sets)
    seed_list = parse_seeds(seeds)
    bar = EpochBar(recipe.epochs)
    on_epoch = _per_run(bar, lambda seed: f"seed {seed}: ")
    try:
        result = run_sweep(recipe, seeds=seed_list, out=out, data_dir=data_dir, device=device,
                           presets=presets, groups=list(groups), alphas=alphas,
                           train_options={"amp": amp},
                           on_run=lambda s, r: click.echo(_summary_line(recipe.name, s, r)),
                           on_epoch=on_epoch)
    finally:
        bar.close()
    rows = summary(result.result)
    for r in rows:
        click.echo(f"{r['run']:>8}  {r['group']:<12} {r['split']:<5} L(0) {r['loss_start']:.4g}"
                   f"  L(max) {r['loss_max']:.4g} at {r['alpha_max']:.2f}  L(1) "
                   f"{r['loss_end']:.4g}  {r['shape']:<9} barrier {r['barrier_height']:.3g}")
    click.echo(f"wrote {result.result_path}")
    if plot:
        from ckptscope.plots import plot_result

        figure = Path(out) / "result.png"
        _save_figure(plot_result(result.result, title=recipe.name), figure)
        click.echo(f"wrote {figure}")


@click.command()
@click.argument("target", required=False)
@click.option("--out", type=click.Path(file_okay=False), default=None)
@click.option("--seeds", default=None, help="A count (3) or a list (0-4, 0,2); default: 3 for "
              "fig1a, 1 for figA17.")
@click.option("--epochs", "epochs", multiple=True, metavar="[PANEL=]N",
              help="Override training epochs (fig1a: spiral=N, digits=N); repeatable.")
@click.option("--alphas", type=click.IntRange(min=2), default=51, show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs trained at once (one thread each when > 1).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:i].")
@click.option("--list", "list_", is_flag=True, help="List the targets and their commands.")
@click.option("--data", "data_dir", default=None, metavar="DIR",
              help="rebasin: a folder with MNIST's IDX files (default: the shipped digits).")
def reproduce(target, out, seeds, epochs, alphas, jobs, device, list_, data_dir):
    """Regenerate a figure of the paper (fig1a, figA17, rebasin on a CPU; --list for the
    rest)."""
    from ckptscope.train import reproduce as repro
    from ckptscope.train.sweep import parse_seeds

    if list_ or target is None:
        for t in repro.TARGETS.values():
            click.echo(f"{t.name:<8} {'CPU' if t.cpu else 'GPU'}  {t.description}")
            for command in t.commands:
                click.echo(f"           {command}")
        return
    if target not in repro.TARGETS:
        raise CkptscopeError(f"unknown target {target!r}; known: {', '.join(repro.TARGETS)}.")
    if not repro.TARGETS[target].cpu:
        raise CkptscopeError(f"{target} is GPU-sized; run its commands (`ckptscope reproduce "
                             f"--list`) on a machine with CIFAR and a GPU.")
    if out is None:
        raise CkptscopeError(f"give --out DIR for {target}.")
    panel_epochs, default_epochs = {}, None
    for item in epochs:
        key, sep, value = item.rpartition("=")
        try:
            if sep:
                panel_epochs[key] = int(value)
            else:
                default_epochs = int(value)
        except ValueError:
            raise CkptscopeError(f"--epochs {item!r} is not [PANEL=]N.") from None
    announce = lambda panel, seed, r: click.echo(  # noqa: E731
        _summary_line(f"{target} {panel}", seed, r), err=True)
    started = time.monotonic()
    if target == "fig1a":
        seed_list = parse_seeds(int(seeds) if seeds and seeds.isdigit() else seeds or 3)
        if default_epochs is not None:
            panel_epochs = {p: default_epochs for p in repro.FIG1A} | panel_epochs
        result = repro.fig1a(out, seeds=seed_list, epochs=panel_epochs, alphas=alphas,
                             jobs=jobs, device=device, on_run=announce)
    elif target == "rebasin":
        from ckptscope.train.rebasin import barrier_table, rebasin

        seed_list = parse_seeds(int(seeds) if seeds and seeds.isdigit() else seeds or 2)
        result = rebasin(out, seeds=seed_list, epochs=default_epochs, alphas=alphas,
                         data_dir=data_dir, device=device, on_run=announce)
    else:
        seed_list = parse_seeds(int(seeds) if seeds and seeds.isdigit() else seeds or 1)
        result = repro.figa17(out, seeds=seed_list, epochs=default_epochs, alphas=alphas,
                              jobs=jobs, device=device, on_run=announce)
    figure = Path(out) / f"{target}.png"
    _save_figure(result.figure, figure)
    table = (barrier_table(result.rows) if target == "rebasin"
             else repro.verdict_table(result.rows))
    write_text(Path(out) / f"{target}.md", table)
    click.echo(table)
    click.echo(f"wrote {figure}, {Path(out) / f'{target}.md'}, "
               f"{', '.join(map(str, result.result_paths.values()))} "
               f"({time.monotonic() - started:.0f}s)")


@click.command()
@click.option("--recipe", "recipe_name", required=True, metavar="NAME|FILE.toml")
@click.option("--spawn-at", required=True, metavar="K1,K2,...",
              help="Epochs to spawn children at (0: the init), e.g. 0,1,2,5,10.")
@click.option("--copies", type=click.IntRange(min=2), default=2, show_default=True,
              help="Children per spawn epoch.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The parent's seed; copy C trains with seed + 1 + C.")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--parent", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Spawn from this finished run (trained with --save-every) instead of "
                   "training OUT/parent.")
@_SET
@_DATA
@_DEVICE
@click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX",
              help="A group to evaluate besides the whole model; repeatable.")
@click.option("--alphas", type=click.IntRange(min=2), default=11, show_default=True)
@click.option("--plot", is_flag=True, help="Also write DIR/instability.png.")
def instability(recipe_name, spawn_at, copies, seed, out, parent, sets, data_dir, device, groups,
                alphas, plot):
    """Frankle et al.'s instability test: barriers between children spawned at each epoch K."""
    from ckptscope.train.instability import instability as run_instability
    from ckptscope.train.instability import parse_epochs, stability_table

    recipe = _recipe(recipe_name, sets)
    bar = EpochBar(recipe.epochs)
    on_epoch = _per_run(bar, lambda label: f"{label}: ")
    result = run_instability(
        recipe, spawn_at=parse_epochs(spawn_at), out=out, copies=copies, seed=seed,
        parent=parent, data_dir=data_dir, device=device, groups=list(groups), alphas=alphas,
        on_epoch=on_epoch, on_run=lambda label, r: click.echo(_run_line(label, r), err=True))
    from ckptscope.cli.output import table

    def spread(std: float, scale: float, digits: str) -> str:  # one pair: no spread
        return "" if std != std else f" +- {scale * std:{digits}}"

    click.echo(table(["K", "error barrier %", "loss barrier", "final accuracy"], [
        [str(r["spawn"]), f"{100 * r['error_barrier']:.2f}"
         + spread(r["error_barrier_std"], 100, ".2f"),
         f"{r['loss_barrier']:.4g}" + spread(r["loss_barrier_std"], 1, ".2g"),
         f"{r['final_accuracy']:.4f}"]
        for r in stability_table(result.result)]))
    click.echo(f"wrote {result.result_path}")
    if plot:
        from ckptscope.trajectory_plots import plot_instability

        figure = Path(out) / "instability.png"
        _save_figure(plot_instability(result.result), figure)
        click.echo(f"wrote {figure}")
