"""Replace a folder as a whole: build the new content beside it, then swap the two atomically.

A run that rewrites a folder ``<parent>/<name>`` works in a staging folder beside it,
``<parent>/.<name>.partial``, and only exchanges the two when the new content is complete, so
an interruption at any moment leaves ``<name>`` either as it was or complete:

1. [`stage`][moeref.vectors.staging.stage] removes a stale staging folder (the leftover of an
   interrupted run), creates a fresh one and fills it with the target's current content as hard
   links (a copy where linking fails, e.g. across file systems), so that files the run does not
   rewrite are carried over. Writers must replace files in the staging folder by renaming a new
   file over them (never write into a linked file in place: that would change the target too).
2. [`swap_in`][moeref.vectors.staging.swap_in] puts the staging folder in place: one
   ``os.rename`` when the target does not exist; otherwise Linux ``renameat2(RENAME_EXCHANGE)``,
   which exchanges the two names in one step, after which the old tree (now under the staging
   name) is deleted. Where that call does not exist or the file system refuses it, the fallback
   is two renames, target to ``<parent>/.<name>.previous`` and staging to target, then the old
   tree is deleted. An exception between the two renames (Ctrl-C) is undone on the spot; a crash
   (power loss, ``SIGKILL``) there leaves no target, which
   [`repair`][moeref.vectors.staging.repair] mends at the start of the next run.
3. [`leftovers`][moeref.vectors.staging.leftovers] lists what an interrupted run left beside a
   folder, for messages.

The names ``.<name>.partial`` and ``.<name>.previous`` are reserved: a run deletes them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from ._errors import VectorsError

__all__ = ["resolve_target", "staging_path", "previous_path", "stage", "exchange", "swap_in", "repair", "discard", "leftovers"]

RENAME_EXCHANGE = 2
"""``renameat2`` flag: exchange the two paths atomically (Linux 3.15+, ``<linux/fs.h>``)."""

AT_FDCWD = -100
"""``renameat2`` directory descriptor meaning "relative to the working directory"."""


def _named(target: str | Path) -> Path:
    """``target`` with a usable last component (``.`` and ``..`` resolved)."""
    target = Path(target)
    return target if target.name not in ("", "..") else target.resolve()


def staging_path(target: str | Path) -> Path:
    """``<parent>/.<name>.partial``: where a run builds the new content of ``target``."""
    target = _named(target)
    return target.with_name(f".{target.name}.partial")


def previous_path(target: str | Path) -> Path:
    """``<parent>/.<name>.previous``: the old content during the fallback swap."""
    target = _named(target)
    return target.with_name(f".{target.name}.previous")


def resolve_target(out: str | Path) -> Path:
    """The absolute, symlink-free path of the folder to replace; a VectorsError if it cannot be one.

    Refused: an existing file, the file-system root, and the working directory or a folder that
    contains it (the swap would move the working directory away).
    """
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise VectorsError(f"{out} exists and is not a folder")
    if target.parent == target:
        raise VectorsError(f"{out} is the root of the file system; choose a folder below it")
    cwd = Path.cwd().resolve()
    if cwd == target or target in cwd.parents:
        raise VectorsError(
            f"{out} is the working directory or contains it; the folder is replaced as a whole, "
            "so run from outside it (or --out a subfolder)"
        )
    return target


def discard(path: Path) -> None:
    """Delete ``path`` (a folder tree, a file or a link) if it exists."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def stage(target: Path, skip: Callable[[Path], bool] = lambda rel: False) -> Path:
    """Create a fresh staging folder beside ``target`` holding the target's content as hard links.

    Parameters
    ----------
    target : Path
        The folder to replace, as returned by [`resolve_target`][moeref.vectors.staging.resolve_target]
        (it need not exist; its parent is created).
    skip : callable (relative path) -> bool
        Files not to carry over (temporary files, a manifest the run rewrites anyway).

    Returns
    -------
    Path
        The staging folder, ``<parent>/.<name>.partial``.
    """
    staging = staging_path(target)
    discard(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    if not target.is_dir():
        return staging
    for root, dirs, files in os.walk(target):
        src_dir = Path(root)
        dst_dir = staging / src_dir.relative_to(target)
        if src_dir != target:
            dst_dir.mkdir()
        shutil.copymode(src_dir, dst_dir)
        for name in files:
            rel = (src_dir / name).relative_to(target)
            if not skip(rel):
                _link_or_copy(src_dir / name, dst_dir / name)
        for name in [d for d in dirs if (src_dir / d).is_symlink()]:  # os.walk lists links to folders as folders
            dirs.remove(name)
            os.symlink(os.readlink(src_dir / name), dst_dir / name)
    return staging


def _renameat2():
    """libc's ``renameat2`` as a ctypes function, or None where there is none (not Linux, old libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Exchange the existing paths ``a`` and ``b`` in one atomic step (``renameat2(RENAME_EXCHANGE)``).

    Returns False, changing nothing, where the system cannot (no such call; ``ENOSYS``, or
    ``EINVAL`` from a file system without the flag); raises OSError for any other failure.
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the renames) to disk, where the system allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swap_in(staging: Path, target: Path) -> None:
    """Put the complete ``staging`` folder in place of ``target`` and delete the old content.

    At every instant ``target`` holds either its old content or the new one, except, in the
    fallback only, after a crash between its two renames (see [`repair`][moeref.vectors.staging.repair]).
    """
    if not target.exists():
        os.rename(staging, target)
        _sync_folder(target.parent)
    elif exchange(staging, target):
        _sync_folder(target.parent)
        discard(staging)  # the old tree, now under the staging name
    else:
        previous = previous_path(target)
        discard(previous)
        try:
            os.rename(target, previous)
            os.rename(staging, target)
        except BaseException:
            if previous.exists() and not target.exists():  # undo the first rename
                os.rename(previous, target)
            raise
        _sync_folder(target.parent)
        discard(previous)


def repair(target: Path, complete: Callable[[Path], bool]) -> str | None:
    """Mend what a crash during the fallback swap left; return what was done (None: nothing to do).

    ``.<name>.previous`` without ``target``: when ``complete(staging)`` the crash came between
    the two renames and the swap is finished; otherwise the old content is moved back.
    ``.<name>.previous`` beside ``target``: the old tree was not yet deleted, and now is.
    """
    previous, staging = previous_path(target), staging_path(target)
    if not previous.is_dir():
        return None
    if target.exists():
        discard(previous)
        return f"removed {previous.name}, the old content of an earlier run"
    if staging.is_dir() and complete(staging):
        os.rename(staging, target)
        discard(previous)
        return f"finished an interrupted swap: {staging.name} -> {target.name}"
    os.rename(previous, target)
    return f"restored {target.name} from {previous.name}"


def leftovers(target: str | Path) -> list[Path]:
    """The staging and previous folders an interrupted run left beside ``target`` (existing ones)."""
    return [p for p in (staging_path(target), previous_path(target)) if p.exists()]
