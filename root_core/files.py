"""Writing a file so that nobody ever sees half of it: the one helper every table, harvest and plot uses."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Content = bytes | str | Callable[[BinaryIO], None]

# Filesystems without hard links (FAT, some network mounts) answer os.link with one of these.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def write_atomically(target: str | os.PathLike, content: Content, *, exclusive: bool = False) -> Path:
    """Write ``content`` to ``target``: a reader sees the old file (or none) or the whole new one.

    ``content`` is bytes, text (written as UTF-8) or a function that writes to a binary stream
    (``np.save``, ``fig.savefig``, ...). The data goes to a temporary file in the target's folder, is
    fsynced, and only then takes the target's name; on any error the temporary file is removed. The file
    gets the mode a plain ``open()`` would give it (``0o666 & ~umask``), not ``mkstemp``'s private 0600.

    ``exclusive=True`` never replaces an existing file: the finished temporary file is hard-linked to the
    target, which fails with ``FileExistsError`` if the name is taken, even when two writers finish at the
    same moment (a check for existence followed by a rename would let the later one silently win).
    """
    target = Path(target)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            if hasattr(os, "fchmod"):  # POSIX; Windows has no such modes
                os.fchmod(stream.fileno(), 0o666 & ~current_umask())
            if callable(content):
                content(stream)
            else:
                stream.write(content.encode("utf-8") if isinstance(content, str) else content)
            stream.flush()
            os.fsync(stream.fileno())
        if exclusive:
            _link_exclusively(temp, target)
        else:
            os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_directory(target.parent)
    return target


def _link_exclusively(temp: str, target: Path) -> None:
    try:
        os.link(temp, target)
    except OSError as error:
        if isinstance(error, FileExistsError) or error.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here: claim the name with an exclusive create, then move the whole file onto it.
        # Still never replaces another writer's file; a reader may see an empty file for a moment.
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(temp, target)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_directory(folder: str | os.PathLike) -> None:
    """Make a rename or link in ``folder`` durable on POSIX; not possible (and not needed) on Windows."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
