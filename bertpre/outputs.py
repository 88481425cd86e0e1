"""Writing outputs without ever losing what the user owns: one rule used by every command.

- ``check_apart``: an output may not be, contain or lie inside any input.
- ``check_replaceable``: an existing output is replaced only with ``--overwrite`` and only
  by the same kind of thing (a file by a file, a folder by a folder).
- ``output_lock``: two commands writing the same output at once are refused.
- ``staged_output``: a folder is written into a hidden staging folder beside the target and
  renamed into place when complete.
- ``atomic_write``: a file is written to a temporary file beside the target, fsynced and
  renamed over it.

An interrupted write leaves at most a hidden ``.NAME.partial`` (removed by the next run),
never an output that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from bertpre.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _real(path: str | Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def check_apart(output: str | Path, inputs: Iterable[str | Path], option: str = "--output") -> None:
    """Refuse an ``output`` that is, contains or lies inside one of ``inputs`` (paths that
    do not exist, e.g. glob patterns, are skipped: their matches should be passed too)."""
    target = _real(output)
    for item in inputs:
        if not os.path.lexists(item):
            continue
        source = _real(item)
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise UserError(f"{option} {output} {relation} the input {item}; write the output elsewhere")


def check_replaceable(output: str | Path, overwrite: bool, kind: str, option: str = "--output") -> None:
    """``kind`` is "file" or "folder". An existing ``output`` of another kind is always refused;
    one of the same kind (a non-empty folder, any file) only without ``overwrite``."""
    path = Path(output)
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        if kind == "file":
            raise UserError(f"{option} {output} is a folder; name a file")
        if not any(path.iterdir()):
            return
    elif kind == "folder":
        raise UserError(f"{option} {output} is a file; name a folder")
    if not overwrite:
        what = "exists" if kind == "file" else "exists and is not empty"
        raise UserError(f"{option} {output} {what} (use --overwrite to replace it)")


@contextlib.contextmanager
def output_lock(output: str | Path, option: str = "--output") -> Iterator[None]:
    """Hold an exclusive lock on ``output`` (a hidden ``.NAME.lock`` beside it) for the block;
    a second writer gets a one-line error instead of racing the first."""
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        handle = open(output.parent / f".{output.name}.lock", "a+b")
    except OSError as e:
        raise UserError(f"{option} {output}: cannot write there ({e.strerror})") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{option} {output}: another bertpre command is writing it; wait for it to finish") \
                from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(handle.name)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


@contextlib.contextmanager
def staged_output(output: Path, overwrite: bool, option: str = "--output",
                  inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A staging folder next to ``output`` that becomes ``output`` only when the block completes.

    ``output`` must be apart from ``inputs`` and, if it exists, a folder that is empty or
    that ``overwrite`` allows replacing. An existing ``output`` is replaced only at the very
    end, by two renames.
    """
    output = Path(output)
    check_apart(output, inputs, option)
    check_replaceable(output, overwrite, "folder", option)
    with output_lock(output, option):
        staging = output.parent / f".{output.name}.partial"
        previous = output.parent / f".{output.name}.previous"
        for leftover in (staging, previous):
            if leftover.exists():
                shutil.rmtree(leftover)
        try:
            staging.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"{option} {output}: cannot create folder there ({e.strerror})") from None
        try:
            yield staging
            if output.exists():
                output.rename(previous)
            staging.rename(output)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            if e.errno in DISK_FULL:
                raise UserError(f"{option} {output}: disk full while writing ({os.strerror(e.errno)}); "
                                "nothing was written") from None
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(previous, ignore_errors=True)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], what: str | None = None) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over ``path``: a kill at
    any moment leaves the old file or the new one, never a truncated one. A failed write
    raises a UserError that names ``what`` (default: ``path``) and leaves no temporary file."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        reason = "disk full" if e.errno in DISK_FULL else e.strerror
        raise UserError(f"cannot write {what or path} ({reason})") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
