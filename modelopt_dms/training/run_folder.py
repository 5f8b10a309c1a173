"""A training run's folder: one run per folder, resumed only by the recipe that started it.

The folder carries a marker (``.modelopt_dms.json``, kind ``run``) holding the *fingerprint* of the
run: everything that determines what is trained (model, DMS config, data, schedule, seed, world
size). A later ``modelopt-dms run`` into the same folder resumes only if its fingerprint is equal
(``train.steps`` may grow: a longer run continues the same curve); otherwise it is refused with the
changed keys, and ``--restart`` / ``train.resume: false`` starts over (the run's own checkpoint,
log and summary are replaced; nothing else in the folder is touched). A lock file holding the
runner's PID keeps a second run out while the first is alive.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..outputs import MARKER, FolderLock, OutputError, read_marker, write_marker
from .checkpoint import CHECKPOINT_NAMES, latest_checkpoint

__all__ = ["RUN_KIND", "RunConflictError", "RunFolder", "run_fingerprint"]

RUN_KIND = "run"
_RUN_FILES = ("train_log.jsonl", "summary.json", "train_config.json")
# Settings that do not change what a step computes: a resume may differ in them.
_NOT_FINGERPRINTED = {
    "train": {"steps", "checkpoint_every", "snapshot_every", "log_every", "resume"},
    "data": {"cache_dir"},
    "model": {"device"},
}


class RunConflictError(OutputError):
    """The run folder holds another run than the recipe describes."""


def run_fingerprint(sections: dict[str, dict[str, Any]], world_size: int) -> dict[str, Any]:
    """The flattened ``section.key -> value`` settings that determine a run (JSON values)."""
    flat: dict[str, Any] = {"world_size": world_size}
    for section, values in sections.items():
        skip = _NOT_FINGERPRINTED.get(section, set())
        for key, value in values.items():
            if key not in skip:
                flat[f"{section}.{key}"] = json.loads(json.dumps(value))
    return flat


def _diff(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The changed keys, as ``key: old -> new`` lines.

    A key the old run did not record (a setting added later) counts as unchanged when the new value
    is that setting's default (the behaviour the old run had).
    """
    keys = sorted(set(old) | set(new))
    changed = [
        k for k in keys if old.get(k, defaults.get(k, "(unset)")) != new.get(k, defaults.get(k, "(unset)"))
    ]
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in changed]


class RunFolder:
    """Open (lock, check, mark) a run folder; use as a context manager around the training."""

    def __init__(
        self,
        path: Path,
        fingerprint: dict[str, Any],
        steps: int,
        restart: bool = False,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.defaults = defaults or {}
        self.steps = steps
        self.restart = restart
        self.lock = FolderLock(path / ".lock", f"run folder {path}")

    def _check_ownership(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"output.dir {self.path} exists and is not a folder; choose another one.")
        if self.path.is_dir() and any(p.name != ".lock" for p in self.path.iterdir()):
            marker = read_marker(self.path)
            if marker is None or marker["kind"] != RUN_KIND:
                raise OutputError(
                    f"output.dir {self.path} is not empty and is not a modelopt-dms run folder (no {MARKER} "
                    "marker); nothing in it is touched. Choose a new or empty output.dir."
                )

    def changed_settings(self) -> list[str]:
        """The settings (``key: old -> new``) in which this run differs from the one the folder holds."""
        recorded = (read_marker(self.path) or {}).get("fingerprint", {})
        return _diff(recorded, self.fingerprint, self.defaults)

    @property
    def resumes(self) -> bool:
        """Whether the run goes on from the folder's checkpoint: there is one and no restart is asked."""
        return not self.restart and latest_checkpoint(str(self.path)) is not None

    def open(self) -> RunFolder:
        """Lock the folder and decide between a fresh start, a resume and a refusal."""
        self._check_ownership()
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self._check_ownership()  # again, under the lock
            if self.resumes:
                ckpt = latest_checkpoint(str(self.path))
                changed = self.changed_settings()
                if changed:
                    raise RunConflictError(
                        f"output.dir {self.path} holds a checkpoint of a different run; changed: "
                        + "; ".join(changed[:8])
                        + ". Pass --restart (recipe: train.resume: false) to start over, or choose another "
                        "output.dir."
                    )
                step = _checkpoint_step(Path(ckpt))
                if step is not None and step > self.steps:
                    raise RunConflictError(
                        f"output.dir {self.path} holds a checkpoint at step {step}, past train.steps = "
                        f"{self.steps}. Raise train.steps to continue it, or pass --restart to start over."
                    )
            if self.restart:
                self._remove_run_files()
            write_marker(self.path, RUN_KIND, fingerprint=self.fingerprint)
        except BaseException:
            self.lock.release()
            raise
        return self

    def _remove_run_files(self) -> None:
        """The run's own checkpoint, log and summary (the marker says the folder is a run)."""
        for name in CHECKPOINT_NAMES:
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in _RUN_FILES:
            (self.path / name).unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock."""
        self.lock.release()

    def __enter__(self) -> RunFolder:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(json.loads((path / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_run_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` carries a run marker."""
    marker = read_marker(Path(path))
    return marker is not None and marker["kind"] == RUN_KIND
