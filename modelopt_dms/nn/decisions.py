"""Decision logits, training relaxation and straight-through hard decisions (docs/design.md §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import as_dtype

__all__ = ["DMSDecisionAdapter", "logistic_noise", "relaxed_decisions", "row_noise"]

_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    return x ^ (x >> 16)


def _uniform(seed: int, rows: torch.Tensor, heads: int, length: int, salt: int) -> torch.Tensor:
    """Counter-based uniforms in (0, 1), ``(B, heads, length)``, a pure function of the indices."""
    device = rows.device
    h = torch.full((), int(seed) & _M32, dtype=torch.long, device=device)
    h = _mix32(h ^ (rows.long()[:, None, None] & _M32))
    h = _mix32(h ^ torch.arange(heads, device=device)[None, :, None])
    h = _mix32(h ^ torch.arange(length, device=device)[None, None, :])
    h = _mix32(h ^ salt)
    return (h.double() + 0.5) / 2.0**32


def row_noise(seed: int, rows: torch.Tensor, heads: int, length: int) -> torch.Tensor:
    """Logistic(0, 1) noise ``(B, heads, length)`` on ``rows.device``: the difference of two Gumbels.

    Each element is a pure function of ``(seed, row id, head, position)``, so a training row gets
    the same draw whatever batch, rank or accumulation step it lands in, and different rows of a
    global batch get different draws. ``rows``: ``(B,)`` global row ids.
    """
    g = [-torch.log(-torch.log(_uniform(seed, rows, heads, length, salt))) for salt in (0, 1)]
    return (g[0] - g[1]).float()


class _DecisionProjection(nn.Module):
    """Bias-free projection hidden -> kv_heads.

    Deliberately not an ``nn.Linear``: quantization passes (``mtq.quantize``) must not touch it,
    since its output is scaled by ``logit_scale`` and rounding would flip eviction decisions.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DMSDecisionAdapter(nn.Module):
    """RMSNorm + Linear(hidden -> kv_heads, no bias), zero-initialised projection."""

    def __init__(
        self,
        hidden_size: int,
        num_kv_heads: int,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.proj = _DecisionProjection(hidden_size, num_kv_heads, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) decision projection, ``(B, T, kv_heads)``."""
        h32 = as_dtype(hidden, torch.float32)
        # x * rsqrt(mean(x^2) + eps) * weight: the same ops on CPU, one fused kernel on CUDA
        normed = F.rms_norm(h32, (h32.shape[-1],), as_dtype(self.norm_weight, torch.float32), self.eps)
        return self.proj(as_dtype(normed, self.proj.weight.dtype))


def logistic_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Logistic(0, 1) noise as the difference of two Gumbel(0, 1) draws, fully determined by seed."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) % (2**63 - 1))
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand((2, *shape), generator=gen, dtype=torch.float32).clamp(tiny, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    return (gumbel[0] - gumbel[1]).to(device)


def relaxed_decisions(
    logits: torch.Tensor, temperature: float, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(z, hard)``: ``z = (logit + g) / tau`` and straight-through ``1[sigmoid(z) > 0.5]``.

    ``hard`` is exactly 0/1 in the forward pass and carries the gradient of ``sigmoid(z)``.
    """
    z = logits.float()
    if noise is not None:
        z = z + noise
    z = z / temperature
    return z, _StraightThroughStep.apply(z)


class _StraightThroughStep(torch.autograd.Function):
    """Forward: exactly ``1[z > 0]``; backward: the gradient of ``sigmoid(z)``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(z)
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (z,) = ctx.saved_tensors
        prob = torch.sigmoid(z)
        return grad * prob * (1.0 - prob)
