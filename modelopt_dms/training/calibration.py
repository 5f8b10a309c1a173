"""Calibrate the decision threshold of trained heads so that they reach a compression ratio exactly.

Training overshoots its target and :func:`~modelopt_dms.training.selection.pick_snapshot` keeps a
snapshot at or above it, so the chosen heads often compress more than asked (CR 4.9 for a target
of 4). Each eviction costs fidelity, so the threshold is moved back: the config's ``logit_offset``
(:func:`~modelopt_dms.model_dms.set_decision_offset`; a larger offset evicts fewer tokens) is
bisected on training-split rows until the achieved CR is just above ``target x (1 + margin)``.
Only the threshold changes, the trained weights do not, and the value is saved with the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model_dms import dms_config, set_decision_offset
from .selection import score_snapshot

__all__ = ["Calibration", "calibrate_decision_offset"]


@dataclass
class Calibration:
    """The chosen offset, its achieved CR and KL on the calibration rows, and every probe."""

    offset: float
    compression_ratio: float
    kl: float
    goal: float
    probes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:  # noqa: D102
        return {
            "logit_offset": self.offset,
            "compression_ratio": round(self.compression_ratio, 4),
            "kl": round(self.kl, 6),
            "goal_compression_ratio": round(self.goal, 4),
            "probes": self.probes,
        }


def calibrate_decision_offset(
    model: nn.Module,
    rows: torch.Tensor,
    target: float,
    window: int,
    reference: list[torch.Tensor],
    margin: float = 0.05,
    resolution: float = 1 / 32,
    log: Callable[[str], None] = print,
) -> Calibration:
    """Set ``model``'s ``logit_offset`` to the largest value whose CR on ``rows`` is >= ``goal``.

    ``goal = target * (1 + margin)`` (the margin covers text that compresses less than the
    calibration rows). The offset is bracketed in steps of 1 from the current value, then bisected
    down to ``resolution``. ``reference``: the uncompressed model's logits per row (the base
    weights', before LoRA deltas were merged). Leaves ``model`` at the chosen offset.
    """
    if margin < 0 or resolution <= 0:
        raise ValueError(f"margin must be >= 0 and resolution > 0, got {margin} and {resolution}")
    goal = target * (1.0 + margin)
    probes: dict[float, tuple[float, float]] = {}

    def probe(offset: float) -> float:
        set_decision_offset(model, offset)
        cr, kl, _ = score_snapshot(model, rows, window, reference)
        probes[offset] = (cr, kl)
        log(f"[calibrate] logit_offset {offset:+.4f}: CR {cr:.3f}, KL {kl:.4f} (goal CR {goal:.3f})")
        return cr

    start = float(dms_config(model).logit_offset)
    low, high = start, start  # CR(low) >= goal > CR(high) once bracketed
    if probe(start) >= goal:
        while probe(high := high + 1.0) >= goal:
            low = high
            if high - start > 64:
                raise ValueError(f"CR stays above {goal:.2f} for every offset up to {high}: check the rows")
    else:
        while probe(low := low - 1.0) < goal:
            high = low
            if start - low > 64:
                raise ValueError(
                    f"no decision offset reaches CR {goal:.2f} on these rows (down to {low}): train with "
                    "a higher train.cr_end, or calibrate to a lower target."
                )
    while high - low > resolution:
        mid = (low + high) / 2
        if probe(mid) >= goal:
            low = mid
        else:
            high = mid
    set_decision_offset(model, low)
    cr, kl = probes[low]
    trace = [
        {"logit_offset": off, "compression_ratio": round(cr_, 4), "kl": round(kl_, 6)}
        for off, (cr_, kl_) in probes.items()
    ]
    return Calibration(low, cr, kl, goal, trace)
