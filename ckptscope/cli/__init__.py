"""The ``ckptscope`` command: thin click shells over the library.

Each command parses its options, makes one library call, writes and prints. Bad input is one
line on stderr (``error: ...``) and exit status 2, without a traceback (``ckptscope --debug``
or ``CKPTSCOPE_DEBUG=1`` prints the traceback instead); ``check`` and ``compare`` exit 1 when an
expectation fails.

The commands live by family: :mod:`~ckptscope.cli.paths` (demo, path, merge),
:mod:`~ckptscope.cli.inspection` (inspect, distance, list), :mod:`~ckptscope.cli.gates` (check,
compare), :mod:`~ckptscope.cli.figures` (plot), and the trainer's in :mod:`ckptscope.train.cli`
(train, sweep, reproduce). What they print and write is :mod:`~ckptscope.cli.output`; how
they read their options is :mod:`~ckptscope.cli.options`.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import click

from ckptscope.cli.alignment import align
from ckptscope.cli.figures import plot
from ckptscope.cli.gates import check, compare
from ckptscope.cli.inspection import distance, inspect, list_
from ckptscope.cli.output import EXIT_BAD_INPUT
from ckptscope.cli.paths import demo, merge, path
from ckptscope.cli.planes import plane, surface
from ckptscope.cli.study import correlate, report, summarize
from ckptscope.cli.trajectories import trajectory
from ckptscope.errors import CkptscopeError

__all__ = ["cli", "main", "run"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptscope")
@click.option("--debug", is_flag=True,
              help="On an error, print the full traceback instead of one line (also "
                   "CKPTSCOPE_DEBUG=1).")
@click.pass_obj
def cli(state, debug):
    """The loss landscape on the straight line between two checkpoints."""
    if isinstance(state, dict):  # main()'s: read back when a command fails
        state["debug"] = state["debug"] or debug


def _register() -> None:
    """Every family's commands on the group; the trainer's (train, sweep, reproduce) live with
    the trainer."""
    from ckptscope.train.cli import instability, reproduce, sweep, train

    for command in (demo, path, inspect, distance, check, compare, merge, plot, list_,
                    train, sweep, reproduce, plane, surface, align):
        cli.add_command(command)
    for command in (trajectory, instability):
        cli.add_command(command)
    for command in (summarize, correlate, report):  # study: across runs
        cli.add_command(command)


_register()


# --- entry point ---------------------------------------------------------------------------
def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


def _debug_env() -> bool:
    return os.environ.get("CKPTSCOPE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _print_traceback(err: BaseException) -> None:
    """The error's traceback on stderr, with what it replaced (``raise ... from None`` hides
    the original error from a traceback; a debugging user wants it)."""
    err.__suppress_context__ = False
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input is one line on stderr and exit status 2 (with ``--debug`` or
    ``CKPTSCOPE_DEBUG=1``, the traceback instead)."""
    warnings.showwarning = _show_warning
    state = {"debug": _debug_env()}  # the group's --debug flag is written here
    try:
        cli.main(args=argv, prog_name="ckptscope", standalone_mode=False, obj=state)
    except CkptscopeError as err:
        if state["debug"]:
            _print_traceback(err)
        else:
            click.echo(f"error: {err}", err=True)
        return EXIT_BAD_INPUT
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
        if state["debug"]:
            _print_traceback(err)
            return EXIT_BAD_INPUT
        where = f" ({err.filename})" if err.filename else ""
        click.echo(f"error: {err.strerror or err}{where}; check the path, its permissions and "
                   f"the free space on its disk.", err=True)
        return EXIT_BAD_INPUT
    except SystemExit as err:  # check/compare give their verdict as the exit status
        return int(err.code or 0)
    return 0


def run() -> int:
    """The ``ckptscope`` program: :func:`main` in a process of its own, whose C allocator it
    tunes first (:func:`ckptscope.allocator.keep_freed_memory`; ``CKPTSCOPE_MALLOC=default``
    leaves it alone)."""
    from ckptscope.allocator import keep_freed_memory

    keep_freed_memory()
    return main()
