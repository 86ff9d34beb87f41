"""Writing files all at once or not at all.

Every file the package writes (the training checkpoints) goes through :func:`atomic_write`: the
data goes to a temporary file next to the target, which replaces the target only once it is
complete and on disk, so an interruption (Ctrl-C, a crash, a full disk) leaves the previous file
as it was, never a truncated one.
"""
from __future__ import annotations

import os
import secrets
from typing import IO, Any, Callable, Union

import torch

__all__ = ["atomic_write", "atomic_save"]

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[IO], Any], *, text: bool = False,
                 encoding: str = "utf-8") -> None:
    """Create or replace ``path`` with what ``write(f)`` writes to ``f``, atomically.

    ``f`` is a binary file (a text one with ``text=True``) named ``<name>.<random>.tmp`` in the
    directory of ``path``; once ``write`` returns it is flushed, fsync'ed and renamed over ``path``
    (``os.replace``, atomic on POSIX), then the directory is fsync'ed so the rename survives a power
    cut. On any exception, KeyboardInterrupt included, the temporary file is removed, ``path`` is
    left as it was and the exception propagates. The new file has the permissions a plain
    ``open(path, "w")`` gives a new file (0o666 less the umask); nothing of the old one (mode,
    owner, hard links) is carried over.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    tmp = None
    try:
        while tmp is None:
            candidate = os.path.join(directory, f"{name}.{secrets.token_hex(4)}.tmp")
            try:
                # os.open rather than mkstemp: mkstemp's 0o600 would make every checkpoint private.
                fd = os.open(candidate, flags, 0o666)
            except FileExistsError:  # another writer's temporary file: not ours to remove
                continue
            tmp = candidate
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": encoding} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:  # already renamed onto path when the exception came
                pass
        raise
    _fsync_directory(directory)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`: an interrupted save keeps the old file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network ones) refuse fsync on a directory
        pass
    finally:
        os.close(fd)
