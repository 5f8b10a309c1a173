"""A CPU stand-in for a CUDA graph, for tests: record a step's aten ops once, replay them without Python.

Replay semantics are those of ``torch.cuda.CUDAGraph``: every op runs again on the *same* tensors
it saw at capture (same storage), its Python-side arguments (ints, slices, scalars) are frozen, and
nothing the Python code around the ops does is repeated. Capture does not perform the step either
(what it creates holds garbage until the first replay):
ops that write into an existing tensor (``scatter_``, ``add_``, ``copy_``...) are recorded and
skipped, so the captured state is left as it was; ops that only read run (their results are
overwritten at every replay), views are taken once and alias their base.

So code that rebinds a state attribute to a new tensor (``self.length = self.length + 1``), reads
the host (``.item()``), or depends on Python state that moves between steps, gives different
results under :class:`ReplayGraph` than when run eagerly — as it would under a CUDA graph.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["ReplayGraph"]


def _writes_input(func) -> bool:
    """True for ops that mutate an argument (in-place and out= ops)."""
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


def _aliases_input(out, args, kwargs) -> bool:
    """True when every tensor ``out`` holds shares storage with an input (a view, or ``to`` a no-op)."""
    inputs = {
        t.untyped_storage().data_ptr()
        for t in tree_flatten((args, kwargs))[0]
        if isinstance(t, torch.Tensor) and t.device.type != "meta"
    }
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return bool(outs) and all(t.untyped_storage().data_ptr() in inputs for t in outs)


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("host read (.item()/int()/bool() of a tensor) inside a captured step")
        if _writes_input(func):
            self.ops.append((func, args, kwargs, None))
            # the written argument is the result (scatter_, add_, copy_, index_put_ ...)
            return args[0] if "out" not in kwargs else kwargs["out"]
        out = func(*args, **kwargs)
        # schema "views" such as aten.to copy when the dtype changes: what counts is the storage
        if not _aliases_input(out, args, kwargs):
            self.ops.append((func, args, kwargs, out))
        return out


def _copy_results(dest, result) -> None:
    dest_flat, _ = tree_flatten(dest)
    result_flat, _ = tree_flatten(result)
    for d, r in zip(dest_flat, result_flat, strict=True):
        if isinstance(d, torch.Tensor) and isinstance(r, torch.Tensor):
            if d.shape != r.shape:
                raise RuntimeError(f"replayed op changed shape {tuple(d.shape)} -> {tuple(r.shape)}")
            d.copy_(r)


class ReplayGraph:
    """``torch.cuda.CUDAGraph``'s interface (``capture`` context, ``replay``, ``reset``) on CPU."""

    def __init__(self) -> None:
        self.ops: list = []

    @contextmanager
    def capture(self):
        """Record the ops run inside; writes into existing tensors are deferred to :meth:`replay`.

        Like a CUDA graph's, the tensors the captured ops create hold garbage until the first
        replay: here NaN (floats) or -7777777 (integers), so reading one early shows.
        """
        self.ops = []
        with _Recorder(self.ops):
            yield
        for _, _, _, out in self.ops:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
                    t.fill_(float("nan"))
                elif isinstance(t, torch.Tensor) and t.dtype in (torch.int32, torch.int64):
                    t.fill_(-7777777)

    def replay(self) -> None:
        """Run every recorded op again on the recorded tensors, in order."""
        for func, args, kwargs, out in self.ops:
            result = func(*args, **kwargs)
            if out is not None:
                _copy_results(out, result)

    def reset(self) -> None:
        self.ops = []
