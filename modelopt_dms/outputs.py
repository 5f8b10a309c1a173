"""Output folders the project owns: ownership markers, overwrite rules, locks and preflight checks.

Rules every writer follows (exports, run folders):

* a folder the project writes carries a marker file (:data:`MARKER`) naming its kind and the
  entries the project put there;
* ``overwrite`` replaces a target only if it is missing, an empty folder, or a folder of the same
  kind whose entries are all the project's own; anything else (a user's file, a folder of other
  files) is refused with the path named, and nothing is deleted;
* a folder being written is locked (:class:`FolderLock`, a lock file holding the writer's PID; a
  lock whose process is gone is stale and taken over), so two writers never share it;
* leftovers of an interrupted write (temp and moved-aside folders next to the target) are removed
  by the next writer that holds the lock;
* destination, permission and free-space problems are found before any expensive work.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from ._version import __version__
from .fileio import TEMP_MARK, atomic_write_json, fsync_dir

__all__ = [
    "MARKER",
    "FolderLock",
    "OutputError",
    "check_free_space",
    "check_replaceable",
    "clean_leftovers",
    "ensure_writable_parent",
    "read_marker",
    "user_path",
    "write_marker",
]

MARKER = ".modelopt_dms.json"


class OutputError(ValueError):
    """A destination that cannot be written as asked; the message names the path and the fix."""


def user_path(path: str | os.PathLike) -> Path:
    """A path as a user means it: ``~`` expanded (``save_adapters("~/x")`` writes to the home folder)."""
    return Path(os.fspath(path)).expanduser()


# ------------------------------------------------------------------------------------------ markers
def write_marker(folder: Path, kind: str, **extra: Any) -> Path:
    """Record that ``folder`` is a ``kind`` folder of this project and which entries it wrote."""
    entries = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    record = {"kind": kind, "library": "modelopt_dms", "library_version": __version__, "entries": entries}
    return atomic_write_json(folder / MARKER, {**record, **extra})


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder``, or None if it has none (or an unreadable one)."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("kind"), str) else None


def _foreign_entries(folder: Path, kind: str) -> list[str] | None:
    """Entries of ``folder`` the project did not write (None: no marker of ``kind``)."""
    marker = read_marker(folder)
    if marker is None or marker["kind"] != kind:
        return None
    ours = set(marker.get("entries", [])) | {MARKER}
    return sorted(p.name for p in folder.iterdir() if p.name not in ours)


def check_replaceable(target: Path, kind: str, overwrite: bool, what: str) -> None:
    """Raise :class:`OutputError` unless ``target`` may be (re)written as a ``kind`` folder.

    Allowed: missing, an empty folder, or (with ``overwrite``) a folder holding only what an earlier
    ``kind`` write of this project put there.
    """
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputError(
            f"{what} {target} exists and is not a folder; it is left alone. Choose another path, or "
            "remove it yourself."
        )
    entries = list(target.iterdir())
    if not entries:
        return
    foreign = _foreign_entries(target, kind)
    if foreign is None:
        raise OutputError(
            f"{what} {target} is not empty and is not a {kind} folder written by modelopt-dms (no "
            f"{MARKER} marker); nothing in it is touched. Choose a new or empty folder."
        )
    if foreign:
        raise OutputError(
            f"{what} {target} holds files modelopt-dms did not write ({', '.join(foreign[:5])}); "
            "nothing in it is touched. Move them away or choose a new folder."
        )
    if not overwrite:
        raise FileExistsError(
            f"{what} {target} exists and is not empty; pass overwrite=True (CLI: --overwrite, recipe: "
            "export.overwrite: true) to replace it, or choose a new folder."
        )


def clean_leftovers(target: Path) -> list[str]:
    """Remove temp / moved-aside folders an interrupted write left next to ``target``.

    A previous folder that was moved aside but never replaced (a kill between the two renames of
    a non-atomic publish) is put back first. Call it while holding the target's lock: only then
    are such folders certainly abandoned. Returns the names removed.
    """
    removed: list[str] = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    aside = sorted(parent.glob(f".{target.name}.old{TEMP_MARK}*"))
    if aside and not target.exists() and not target.is_symlink():
        os.replace(aside[0], target)
    prefixes = (f".{target.name}{TEMP_MARK}", f".{target.name}.old{TEMP_MARK}")
    for entry in parent.iterdir():
        if entry.name.startswith(prefixes):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


# ------------------------------------------------------------------------------------------ preflight
def ensure_writable_parent(target: Path, what: str) -> None:
    """Raise :class:`OutputError` if ``target``'s folder cannot be created or written."""
    parent = target.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what} {target}: {probe} is a file, so the folder cannot be created.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {target}: no permission to write in {probe}; choose another location.")


def check_free_space(target: Path, need_bytes: int, what: str) -> None:
    """Raise :class:`OutputError` if the file system of ``target`` has less than ``need_bytes`` free."""
    probe = target
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise OutputError(
            f"{what} {target}: needs about {need_bytes / 2**20:,.0f} MiB but only {free / 2**20:,.0f} MiB "
            "are free there; free some space or choose another location."
        )


# ------------------------------------------------------------------------------------------ lock
def _process_start(pid: int) -> str | None:
    """Start time of a process (Linux ``/proc``), to tell a live holder from a reused PID."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict[str, Any]) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # another machine's lock on a shared file system: assume it is held
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = record.get("started")
    return started is None or _process_start(pid) in (None, started)


class FolderLock:
    """An exclusive lock on a folder (or a future folder) via ``<lock_path>``; a context manager."""

    def __init__(self, lock_path: Path, what: str) -> None:
        self.path = lock_path
        self.what = what
        self.held = False

    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`OutputError` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if isinstance(holder, dict) and _alive(holder):
                    raise OutputError(
                        f"{self.what} is in use by another modelopt-dms process (PID {holder.get('pid')} on "
                        f"{holder.get('host')}; lock {self.path}). Wait for it to finish, or use another "
                        "folder."
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            fsync_dir(self.path.parent)
            self.held = True
            return self
        raise OutputError(f"could not take the lock {self.path} for {self.what}")

    def release(self) -> None:
        """Drop the lock (only if this process holds it)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
