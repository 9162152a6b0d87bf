"""Loading notes on stderr: what was done to a checkpoint to read it (a stripped prefix, an
upcast, a Lightning file's trainer keys, a followed tie, a filled counter), each once, naming
its file: ``note: b.ckpt: stripped prefix 'model.' from 120 keys``."""

from __future__ import annotations

import os

import click

from ckptscope.keys import file_notes


class NotePrinter:
    """Prints each loading note once, however many runs share a file."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.labels: set[str] = set()
        # Under torchrun rank 0 prints; RANK is set before any process group exists.
        self.quiet = os.environ.get("RANK", "0") != "0"

    def line(self, text: str) -> None:
        if text not in self.seen and not self.quiet:
            self.seen.add(text)
            click.echo(f"note: {text}", err=True)

    def checkpoint(self, ckpt, default: str = "start") -> None:
        """The notes a checkpoint carries, as read (and matched)."""
        self.labels.add(ckpt.path or default)
        for text in file_notes(ckpt, default):
            self.line(text)

    def files(self, paths) -> None:
        """Files whose notes :meth:`result` prints (read by the library call, not here)."""
        self.labels.update(str(p) for p in paths)

    def result(self, ds) -> None:
        """The loading notes a result records that were not printed yet (those made while
        matching the pair to the model); other notes (resumed points) are the caller's."""
        for note in ds.attrs.get("notes", "").split("; "):
            if note.startswith("run ") and ": " in note:  # "run 0: b.ckpt: ..." in a sweep
                note = note.split(": ", 1)[1]
            if any(note.startswith(f"{label}: ") for label in self.labels):
                self.line(note)
