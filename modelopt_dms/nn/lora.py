"""Low-rank deltas (LoRA) on the attention projections of DMS layers.

For retrofits that also adapt the attention a little while the decision heads learn what to forget.

Each target projection ``W`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` by default) gets a
:class:`LowRankDelta` that adds ``scale * B (A x)`` to its output through a forward hook, so the
model's modules, names and state dict keys stay as they were; the deltas live in a ``dms_lora``
submodule of each DMS attention layer. ``B`` starts at zero, so attaching changes nothing until
training moves it. The deltas are float32 whatever the base dtype (a master copy); the forward casts
them, not the activations, to the compute dtype.

* :func:`attach_lora` adds them (trainable); :func:`lora_disabled` runs the original weights (the
  distillation teacher) without a second copy of the model;
* :func:`merge_lora` folds ``scale * B A`` into the base weights and removes the deltas: the model is
  then a plain DMS model (what ``mto.save`` and the exporters expect);
* :func:`base_weights_digest` is a SHA-256 of the target weights (as bfloat16 bits, so float32 or
  bfloat16 loading does not matter): an artifact records the base its deltas were trained on, and
  loading refuses other weights, including a base the same deltas were already merged into.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LORA_ATTR",
    "LowRankDelta",
    "attach_lora",
    "base_weights_digest",
    "fold_delta",
    "has_lora",
    "lora_deltas",
    "lora_disabled",
    "merge_lora",
    "require_merged",
    "target_weights",
    "weight_name",
]

LORA_ATTR = "dms_lora"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LowRankDelta(nn.Module):
    """``x -> scale * B (A x)`` added to a frozen linear layer's output (``B`` starts at zero)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        device = linear.weight.device
        f32 = torch.float32
        self.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, device=device, dtype=f32))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, device=device, dtype=f32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True
        self._handle = linear.register_forward_hook(self._add_to_output)  # a bound method: deep-copies

    def _add_to_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return output
        x = args[0]  # in the compute dtype: the small factors are cast, not the activations
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return output + self.scale * ((x @ a.t()) @ b.t()).to(output.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B A``: what merging adds to the base weight (float32)."""
        return self.scale * (self.lora_b @ self.lora_a)

    def remove(self) -> None:
        """Stop adding the delta (the hook is removed)."""
        self._handle.remove()


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    from .attention import DMSAttention  # the DMS attention imports the package: import late

    mods = [m for m in model.modules() if isinstance(m, DMSAttention)]
    return sorted(mods, key=lambda m: int(m.layer_idx))


def target_weights(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Parameter]:
    """The weight of every target projection of every DMS layer, by parameter name."""
    prefix = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in _attention_layers(model):
        for t in targets:
            proj = getattr(layer, t, None)
            if not isinstance(proj, nn.Linear):
                raise ValueError(
                    f"LoRA target {t!r} is not a linear layer of {type(layer).__name__} (layer "
                    f"{int(layer.layer_idx)}); choose among its projections, e.g. "
                    f"{list(DEFAULT_LORA_TARGETS)}."
                )
            out[f"{prefix[id(layer)]}.{t}.weight"] = proj.weight
    return out


def attach_lora(
    model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_LORA_TARGETS
) -> list[nn.Parameter]:
    """Add a rank-``rank`` delta to every target projection of every DMS layer; returns its parameters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if has_lora(model):
        raise ValueError("The model already has LoRA deltas: merge_lora(model) first, or train those.")
    layers = _attention_layers(model)
    if not layers:
        raise ValueError("The model has no DMS attention; apply the 'dms' mode before attaching LoRA.")
    target_weights(model, targets)  # every target exists, before anything is added
    params = []
    for layer in layers:
        deltas = nn.ModuleDict({t: LowRankDelta(getattr(layer, t), rank, alpha) for t in targets})
        layer.add_module(LORA_ATTR, deltas)
        params += list(deltas.parameters())
    return params


def lora_deltas(model: nn.Module) -> dict[str, LowRankDelta]:
    """Every attached delta by the name of the weight it adds to (``...self_attn.q_proj.weight``)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankDelta):
            holder, target = name.rsplit(f".{LORA_ATTR}.", 1)
            out[f"{holder}.{target}.weight"] = mod
    return out


def has_lora(model: nn.Module) -> bool:
    """Whether LoRA deltas are attached (not merged)."""
    return any(isinstance(m, LowRankDelta) for m in model.modules())


def require_merged(model: nn.Module, action: str) -> None:
    """Refuse ``action`` on a model with attached deltas (they live outside its weights)."""
    if has_lora(model):
        raise ValueError(
            f"The model has LoRA deltas attached (from training with train.lora_rank); {action} needs them "
            "in the weights: call modelopt_dms.nn.lora.merge_lora(model) first (save_adapters before "
            "that keeps them as a small artifact)."
        )


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its original projection weights (no-op without LoRA); restores on exit."""
    deltas = list(lora_deltas(model).values())
    previous = [d.enabled for d in deltas]
    for d in deltas:
        d.enabled = False
    try:
        yield model
    finally:
        for d, prev in zip(deltas, previous, strict=True):
            d.enabled = prev


@torch.no_grad()
def fold_delta(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
    """``weight += scale * B A`` in float32, written back in the weight's dtype."""
    a = lora_a.to(device=weight.device, dtype=torch.float32)
    b = lora_b.to(device=weight.device, dtype=torch.float32)
    weight.copy_((weight.float() + scale * (b @ a)).to(weight.dtype))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every delta into its base weight and remove the deltas; returns ``model``."""
    weights = dict(model.named_parameters())
    for name, delta in lora_deltas(model).items():
        fold_delta(weights[name], delta.lora_a, delta.lora_b, delta.scale)
        delta.remove()
    for layer in _attention_layers(model):
        if LORA_ATTR in layer._modules:
            delattr(layer, LORA_ATTR)
    return model


def weight_name(tensor_name: str) -> str:
    """The base weight of a saved delta tensor: ``X.dms_lora.q_proj.lora_a`` -> ``X.q_proj.weight``."""
    holder, rest = tensor_name.rsplit(f".{LORA_ATTR}.", 1)
    return f"{holder}.{rest.rsplit('.', 1)[0]}.weight"


def base_weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the named weights as bfloat16, by sorted name (the base a set of deltas fits).

    bfloat16 bits, so the same checkpoint loaded in float32 or bfloat16 gives one digest.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        bits = weights[name].detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
        h.update(bits.numpy().tobytes())
    return h.hexdigest()
