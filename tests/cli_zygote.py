"""``modelopt-dms`` runs forked from a process that has already imported it (a forkserver).

The fault-injection tests start the command 40-odd times; each fresh interpreter spends ~6 s of CPU
importing torch, transformers and Model Optimizer before the work they kill begins. A forkserver
imports them once and forks a clean child per run (no thread pool has started in it, so the fork is
safe); the child chdirs, sets its environment, sends stdout to a file and calls the CLI's ``main``,
so what is killed is the same code path as ``python -m modelopt_dms.cli``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
_context = None


def _forkserver():
    """The forkserver context, its server preloading the CLI (started on first use)."""
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(["modelopt_dms.cli", "cli_zygote"])
    return _context


def _child(args: list[str], cwd: str, log: str) -> None:
    os.chdir(cwd)
    os.environ.update(_ENV)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered, like ``python -u``
    sys.stderr = open(2, "w", closefd=False)
    from modelopt_dms.cli import main

    code = main(args)
    sys.stdout.flush()
    os._exit(code)


class CliRun:
    """One ``modelopt-dms ARGS`` run in ``cwd``; its stdout goes to ``log``."""

    def __init__(self, args: list[str], cwd: Path, log: Path) -> None:
        self.log = Path(log)
        self.log.write_text("")
        ctx = _forkserver()
        self.proc = ctx.Process(target=_child, args=(list(args), str(cwd), str(self.log)), daemon=True)
        # the server (started by the first run) inherits this environment: offline, tests importable
        saved = {k: os.environ.get(k) for k in (*_ENV, "PYTHONPATH")}
        here = str(Path(__file__).resolve().parent)
        os.environ.update(_ENV, PYTHONPATH=os.pathsep.join(p for p in (here, saved["PYTHONPATH"]) if p))
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def wait_for(self, line: str, timeout: float = 300) -> float | None:
        """Block until ``line`` is in the output; its time, or None if the run ended without it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if line in self.log.read_text():
                return time.time()
            if not self.proc.is_alive():
                return time.time() if line in self.log.read_text() else None
            time.sleep(0.02)
        raise TimeoutError(f"no {line!r} after {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, then reap."""
        self.proc.kill()
        self.proc.join()

    def wait(self, timeout: float = 600) -> int:
        """Exit code after the run ends."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.kill()
            raise TimeoutError(f"run did not end in {timeout} s")
        return self.proc.exitcode
