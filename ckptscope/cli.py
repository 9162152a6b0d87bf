"""The ``ckptscope`` command: thin click shells over the library.

Each command parses its options, makes one library call, writes and prints. Bad input is one
line on stderr (``error: ...``) and exit status 2, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click

from ckptscope.errors import CkptscopeError


# --- output helpers ------------------------------------------------------------------------
class ProgressBar:
    """A one-line progress bar on stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str, *, enabled: bool | None = None):
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{total} {elapsed:5.1f}s eta {eta:5.1f}s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _format_table(rows: list[dict]) -> str:
    headers = [
        "group",
        "split",
        "L(start)",
        "L(max)",
        "at alpha",
        "L(end)",
        "acc(start)",
        "acc(end)",
        "distance",
    ]
    cells = [
        [
            r["group"],
            r["split"],
            f"{r['loss_start']:.4g}",
            f"{r['loss_max']:.4g}",
            f"{r['alpha_max']:.2f}",
            f"{r['loss_end']:.4g}",
            f"{r['acc_start']:.3f}",
            f"{r['acc_end']:.3f}",
            f"{r['distance']:.4g}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> None:
    """Save a figure atomically (the format follows the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _parse_options(pairs: tuple[str, ...]) -> dict | None:
    """``key=value`` pairs; values are JSON where they parse (``widths=[2,50,1]``), else text."""
    if not pairs:
        return None
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CkptscopeError(
                f"adapter option {pair!r} is not KEY=VALUE (e.g. widths=[2,50,1])."
            )
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _groups(
    adapter_spec: str | None,
    presets: tuple[str, ...],
    groups: tuple[str, ...],
    keys: list[str],
    metadata: dict,
) -> dict[str, str]:
    """Group specs from ``--preset`` (through the adapter) and ``--group``, in that order."""
    from ckptscope.adapters import get_adapter
    from ckptscope.groups import normalise_groups

    out: dict[str, str] = {}
    if presets:
        spec = adapter_spec or metadata.get("adapter")
        if spec is None:
            raise CkptscopeError("--preset needs an adapter: pass --adapter NAME.")
        adapter = get_adapter(spec)
        for name in presets:
            if name not in adapter.presets:
                raise CkptscopeError(
                    f"adapter {adapter.name!r} has no preset {name!r}; known: "
                    f"{sorted(adapter.presets) or 'none'}."
                )
            out.update(adapter.presets[name](keys))
    for name, pattern in normalise_groups(list(groups)).items():
        out[name] = pattern
    return out


# --- commands ------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptscope")
def cli():
    """The loss landscape on the straight line between two checkpoints."""


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="ckptscope-demo",
    show_default=True,
    help="Folder for the checkpoints, result.nc and paths.png.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--epochs", type=click.IntRange(min=0), default=None, help="Training epochs (default 600)."
)
def demo(out, seed, epochs):
    """Train the paper's spiral MLP and show its whole-model and per-layer paths."""
    from ckptscope.demo import DEMO_TRAIN, run_demo
    from ckptscope.results import summary

    total = epochs if epochs is not None else DEMO_TRAIN.epochs
    bar = ProgressBar("training  ")

    def on_epoch(record):
        bar(record["epoch"], total)

    click.echo(f"training the spiral MLP (2x50 ReLU, Adam 5e-4) for {total} epochs ...", err=True)
    result = run_demo(
        out, seed=seed, epochs=epochs, on_epoch=on_epoch, progress=ProgressBar("evaluating")
    )
    figure = Path(out) / "paths.png"
    _save_figure(result.figure, figure)
    last = result.history[-1] if result.history else {}
    if last:
        click.echo(
            f"trained: test accuracy {last['test_accuracy']:.3f}, test loss {last['test_loss']:.4f}"
        )
    click.echo(_format_table(summary(result.result)))
    click.echo(f"wrote {result.start}, {result.end}, {result.result_path}, {figure}")


@cli.command()
@click.argument("start", type=click.Path(dir_okay=True))
@click.argument("end", type=click.Path(dir_okay=True))
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="[NAME=]REGEX",
    help="A group of tensors (re.match on the key); repeatable.",
)
@click.option(
    "--preset",
    "presets",
    multiple=True,
    metavar="NAME",
    help="The adapter's group preset (mlp: layers); repeatable.",
)
@click.option(
    "--alphas",
    type=click.IntRange(min=2),
    default=None,
    help="Points evenly spaced on [0, 1], both ends included (default 51).",
)
@click.option(
    "--alpha-range",
    default=None,
    metavar="START:STOP:N",
    help="Points on [START, STOP] instead (extrapolation allowed).",
)
@click.option(
    "--adapter",
    default=None,
    metavar="NAME|pkg.module:attr",
    help="The architecture (default: from the checkpoint's metadata).",
)
@click.option(
    "--adapter-opt",
    "adapter_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="An adapter option, e.g. widths=[2,50,50,1]; repeatable.",
)
@click.option(
    "--data",
    default=None,
    metavar="NAME[:ARG]|pkg.module:attr",
    help="The evaluation data (default: from the metadata or the adapter).",
)
@click.option(
    "--split", type=click.Choice(["test", "train", "both"]), default="test", show_default=True
)
@click.option(
    "--hold",
    type=click.Choice(["end", "start"]),
    default="end",
    show_default=True,
    help="Where the tensors outside a group stay.",
)
@click.option("--no-full", is_flag=True, help="Leave out the whole-model path.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option(
    "--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option(
    "--strategy",
    type=click.Choice(["auto", "loop", "vmap"]),
    default="auto",
    show_default=True,
    help="Evaluator strategy.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of generated data.")
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="Write the result (.nc)."
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a figure (.png, .pdf, .svg).",
)
def path(
    start,
    end,
    groups,
    presets,
    alphas,
    alpha_range,
    adapter,
    adapter_opts,
    data,
    split,
    hold,
    no_full,
    device,
    dtype,
    batch_size,
    strategy,
    seed,
    out,
    plot,
):
    """Evaluate loss and accuracy on the straight line from START to END."""
    from ckptscope.analysis import linear_path
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.path import parse_alpha_range
    from ckptscope.results import save_result, summary

    if alphas is not None and alpha_range is not None:
        raise CkptscopeError("give --alphas or --alpha-range, not both.")
    if out is not None and Path(out).suffix != ".nc":
        raise CkptscopeError(f"--out {out!r} should end in .nc (the result is NetCDF).")
    grid = parse_alpha_range(alpha_range) if alpha_range else (alphas or 51)
    a, b = load_checkpoint(start), load_checkpoint(end)
    group_specs = _groups(adapter, presets, groups, list(a.state), a.metadata)
    ds = linear_path(
        a,
        b,
        adapter,
        data,
        groups=group_specs,
        alphas=grid,
        full=not no_full,
        hold=hold,
        device=device,
        batch_size=batch_size,
        split=split,
        adapter_options=_parse_options(adapter_opts),
        dtype=dtype,
        strategy=strategy,
        seed=seed,
        progress=ProgressBar("evaluating"),
    )
    if out:
        save_result(ds, out)
    if plot:
        from ckptscope.plots import plot_path

        ax = plot_path(ds)
        ax.figure.tight_layout()
        _save_figure(ax.figure, Path(plot))
    click.echo(_format_table(summary(ds)))
    for target in (out, plot):
        if target:
            click.echo(f"wrote {target}")


@cli.command()
@click.argument("start", type=click.Path(dir_okay=True))
@click.argument("end", type=click.Path(dir_okay=True), required=False)
@click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX")
@click.option("--preset", "presets", multiple=True, metavar="NAME")
@click.option("--adapter", default=None, metavar="NAME|pkg.module:attr")
@click.option("--keys/--no-keys", default=True, show_default=True, help="List every tensor.")
def inspect(start, end, groups, presets, adapter, keys):
    """Show a checkpoint's tensors, how groups resolve, and distances to END."""
    from ckptscope.checkpoints import check_pair, describe_dtypes, load_checkpoint
    from ckptscope.distance import parameter_keys, relative_distance
    from ckptscope.groups import resolve_groups

    a = load_checkpoint(start)
    b = load_checkpoint(end) if end else None
    if b is not None:
        check_pair(a.state, b.state, names=(a.path, b.path))
    params = parameter_keys(a.state)
    click.echo(
        f"{a.path}  sha256 {a.sha256[:16]}  {len(a.state)} tensors, "
        f"{sum(a.state[k].numel() for k in params):,} parameters ({describe_dtypes(a.state)})"
    )
    if a.metadata:
        click.echo("metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(a.metadata.items())))
    for note in a.notes:
        click.echo(f"note: {note}")
    if keys:
        width = max(len(k) for k in a.state)
        for k, v in a.state.items():
            kind = "param" if k in params else "buffer"
            click.echo(
                f"  {k.ljust(width)}  {str(tuple(v.shape)):>18}  "
                f"{str(v.dtype).replace('torch.', ''):>8}  {kind}"
            )
    specs = _groups(adapter, presets, groups, list(a.state), a.metadata)
    resolved = resolve_groups(list(a.state), specs, full=True, source=a.path)
    click.echo("groups:")
    for g in resolved:
        n = sum(a.state[k].numel() for k in g.keys if k in params)
        line = f"  {g.name:<16} {g.pattern!r:<24} {len(g.keys):>4} tensors {n:>12,} params"
        if b is not None:
            moved = relative_distance(a.state, b.state, [k for k in g.keys if k in params])
            line += f"  distance {moved:.4g}"
        click.echo(line)


# --- entry point ---------------------------------------------------------------------------
def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input is one line on stderr and exit status 2."""
    warnings.showwarning = _show_warning
    try:
        cli.main(args=argv, prog_name="ckptscope", standalone_mode=False)
    except CkptscopeError as err:
        click.echo(f"error: {err}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except OSError as err:
        click.echo(
            f"error: {err.strerror or err} ({err.filename or ''}); check the path and permissions.",
            err=True,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
