"""Atomic file and folder writes: every output appears complete or not at all.

One helper family for the whole project (adapters, exports, checkpoints, caches, reports):

* :func:`atomic_write_text` / :func:`atomic_write_json` / :func:`atomic_save_safetensors` write a
  sibling temp file, fsync it and ``os.replace`` it over the target;
* :func:`staging_dir` makes a temp folder next to a target folder; :func:`publish_dir` moves it
  into place (the previous folder, if any, is moved aside first and removed only after the new one
  is in place, and put back if the move fails).

Files and folders get the permissions of the process umask (0644 / 0755 by default), like any
other tool's output; ``tempfile.mkdtemp`` alone would leave folders at 0700.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

__all__ = [
    "TEMP_MARK",
    "atomic_copy_file",
    "atomic_save_safetensors",
    "atomic_write_json",
    "atomic_write_text",
    "file_sha256",
    "fsync_dir",
    "normalise_permissions",
    "publish_dir",
    "staging_dir",
    "umask_mode",
]

TEMP_MARK = ".tmp-"  # in the name of every temp file / folder this module creates


def umask_mode(base: int) -> int:
    """``base`` (e.g. 0o777 for folders, 0o666 for files) with the process umask applied."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries to disk (best effort: not every file system supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` a temp sibling of ``path``, fsync it, ``os.replace`` it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode(0o666))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_copy_file(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy ``source`` to ``path`` atomically (``path`` is the old file or the whole copy)."""
    return _replace_atomically(Path(path), lambda tmp: shutil.copyfile(source, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; the parent folder is created if missing."""
    data = text.encode("utf-8")
    return _replace_atomically(Path(path), lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (sorted keys, trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_save_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically."""
    return _replace_atomically(Path(path), lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata))


def normalise_permissions(folder: str | os.PathLike) -> None:
    """Give everything below ``folder`` the umask permissions (some writers create 0600 files)."""
    folder = Path(folder)
    os.chmod(folder, umask_mode(0o777))
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, umask_mode(0o777 if path.is_dir() else 0o666))


def staging_dir(target: str | os.PathLike) -> Path:
    """A new empty temp folder next to ``target`` (same file system, so publishing is a rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}", dir=target.parent))
    os.chmod(tmp, umask_mode(0o777))
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # this file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder ``staged`` to ``target``, replacing what is there.

    Where the file system can (Linux), the two are swapped in one atomic step, so ``target`` is at
    every moment either the previous folder or the new one; the previous one is deleted afterwards.
    Elsewhere the previous ``target`` is renamed aside first (``.<name>.old.tmp-*``; a kill in
    between is repaired by :func:`modelopt_dms.outputs.clean_leftovers`) and put back if the move
    fails. Callers decide beforehand whether ``target`` may be replaced at all.
    """
    staged, target = Path(staged), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        if target.is_dir() and not target.is_symlink() and _exchange(staged, target):
            fsync_dir(target.parent)
            shutil.rmtree(staged, ignore_errors=True)  # now the previous folder
            return target
        old = target.with_name(f".{target.name}.old{TEMP_MARK}{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return target


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
