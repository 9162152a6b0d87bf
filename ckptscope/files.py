"""Files that appear whole or not at all: write to a temporary name beside, then rename.

The temporary is ``.NAME.PID-HOST.RANDOM.tmp`` (or the caller's suffix) in the target's
folder: the writer's process id and a short hash of its host name, so a later write of the
same target can tell a leftover of a killed writer (its process is gone) from the file of a
writer still at work, and removes only the former. Every file is created with mode ``0o666``
less the process's umask, as ``open()`` would create it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ckptscope.errors import CkptscopeError

# Temporaries of another host are never removed: its process ids mean nothing here.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it; another thread creating a file in between
    would get the wrong mode. Linux (4.7 on) shows it in ``/proc/self/status``; elsewhere the
    set-and-restore is the only way.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_pattern(name: str) -> re.Pattern:
    """Our temporaries of target ``name``: the pid and host hash are groups 1 and 2."""
    return re.compile(rf"\.{re.escape(name)}\.(\d+)-([0-9a-f]{{8}})\.[0-9a-f]{{16}}(?:\.\w+)*")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts: signalling it is refused)."""
    if pid <= 0:
        return True  # not a pid we could have written: leave its file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists and belongs to someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` that writers on this host left when they were killed.

    Only files named as :func:`replacing` names them, written on this host by a process that
    no longer exists; never this process's own (another thread may be writing) nor a live
    writer's. Returns the removed paths.
    """
    path = Path(path)
    pattern, removed = _temporary_pattern(path.name), []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    prefix = f".{path.name}."
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        match = pattern.fullmatch(entry.name)
        if match is None or match[2] != _HOST:
            continue
        pid = int(match[1])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(entry.path)
        except OSError:  # gone already, or not ours to remove: either way not our problem
            continue
        removed.append(Path(entry.path))
    return removed


def _create_temporary(path: Path, suffix: str) -> Path:
    """Create an empty temporary for ``path`` (mode 0o666 less the umask) and return it."""
    missing = 0
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{_HOST}.{secrets.token_hex(8)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o666)
        except FileExistsError:
            continue
        except FileNotFoundError:  # the folder went away (another run cleaned up): again
            missing += path.parent.is_dir()
            if missing > 1:  # it is there, and still no file: the file system's own refusal
                raise
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


@contextmanager
def replacing(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it onto ``path``.

    A failure (or an interrupt) inside the block removes the temporary file and leaves any
    earlier ``path`` untouched, so a reader never sees a half-written file. A writer killed
    before it could clean up leaves its temporary behind; the next write of the same ``path``
    removes it (:func:`remove_stale_temporaries`). The file gets mode ``0o666`` less the umask,
    like any file the user creates, also when the writer replaced the temporary with a file of
    its own. ``suffix`` matters to writers that pick the format from the name (matplotlib).

    Example:
        >>> with replacing("result.nc") as tmp:                          # doctest: +SKIP
        ...     ds.to_netcdf(tmp)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = _create_temporary(path, suffix)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        yield tmp
        # Created so already; again in case the writer made the file anew (mkstemp: 0o600).
        with suppress(OSError):  # a filesystem without modes: nothing to honour
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a quota: errors that name no file, or the temporary
        raise write_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_error(path: str | os.PathLike, err: BaseException) -> CkptscopeError:
    """A one-line error for a failed write of ``path``, naming it (a full disk's ``OSError``
    carries no file name, and a writer's own error names only its temporary)."""
    reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(err):
        fix = "free space on that disk or write somewhere else"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "check the folder's permissions or write somewhere else"
    else:
        fix = "check the path and the disk"
    return CkptscopeError(f"cannot write {str(path)!r}: {reason[:200]}; {fix}.")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)
