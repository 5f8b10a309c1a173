"""The training schedule and optimiser settings: one schema for the trainer and the recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import Section

__all__ = ["TrainConfig"]


class TrainConfig(Section):
    """How to train the DMS decision heads (the ``train:`` section of a recipe).

    The compression target anneals linearly from ``cr_start`` to ``cr_end`` over ``anneal_steps``;
    ``cr_end`` defaults to the model's ``DMSConfig.target_compression_ratio``.
    """

    steps: int = Field(200, ge=1)
    # With logit_scale 100 the adapter's effective step is 100x the lr: 1e-3 moves the decision
    # logits by tens per step and stalls training (measured: train KL 0.35-0.5 vs 0.05 at 5e-5).
    lr: float = Field(5e-5, gt=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    grad_accum: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)
    cr_start: float = Field(1.0, ge=1.0)
    cr_end: float | None = Field(None, ge=1.0)
    anneal_steps: int = Field(150, ge=0)
    compression_weight: float = Field(1.0, ge=0.0)
    kl_direction: Literal["forward", "reverse"] = "forward"
    train_all_weights: bool = False
    # > 0: also train rank-r deltas (LoRA) of the attention projections, at lora_lr; the adapters
    # artifact then carries them and loading merges them into the base weights it was trained on
    lora_rank: int = Field(0, ge=0)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_lr: float = Field(2e-4, gt=0.0, le=1.0)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    autocast_bf16: bool = False
    fsdp: bool = False  # shard the model over the torchrun processes (FSDP2); else data parallel
    log_every: int = Field(1, ge=1)
    # the soft-bias training attention: auto = flex_attention on CUDA, fused SDPA blocks elsewhere;
    # eager (T x T bias and softmax) is the oracle both are tested against
    attention: Literal["auto", "eager", "sdpa", "flex"] = "auto"
    gradient_checkpointing: bool = False  # recompute decoder layers in backward (less activation memory)
    fused_kl: bool = True  # lm_head + log-softmax + KL chunked and recomputed: O(chunk x vocab) memory
    kl_chunk: int = Field(1024, ge=1)  # rows of logits at a time (fused and unfused KL)
    kl_beyond_window: bool = False  # KL only at positions > w (exactly 0 before: see the trainer)
    teacher_cache: bool = False  # reuse the teacher's top-k distribution from disk (CPU speed-up)
    teacher_topk: int = Field(64, ge=1, le=65536)  # kept teacher log-probabilities per position
    checkpoint_every: int = Field(50, ge=0)
    # adapters every N steps in <output.dir>/snapshots/step_<N> (0: none), so `modelopt-dms select`
    # can pick the step at a target CR (overshoot the target with cr_end, then select)
    snapshot_every: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    # warm start: a run that starts (not one that resumes) takes its DMS parameters and LoRA deltas
    # from this adapters artifact (another run's snapshot or adapters), e.g. to go on on new text
    init_adapters: str | None = None
    resume: bool = True  # false: start over in output.dir (its run's checkpoint and log are replaced)

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.cr_end is not None and self.cr_end < self.cr_start:
            raise ValueError(f"cr_end ({self.cr_end}) must be >= cr_start ({self.cr_start})")
        if self.snapshot_every and (self.train_all_weights or self.fsdp):
            raise ValueError(
                "train.snapshot_every saves the decision adapters of one process: it needs "
                "train.train_all_weights: false and train.fsdp: false (or set snapshot_every: 0)."
            )
        if self.lora_rank and (self.train_all_weights or self.fsdp):
            raise ValueError(
                "train.lora_rank trains low-rank deltas on frozen base weights in data parallel: it needs "
                "train.train_all_weights: false and train.fsdp: false (or set lora_rank: 0)."
            )
        if self.lora_rank and not self.lora_targets:
            raise ValueError(
                "train.lora_targets is empty: name the projections to adapt, e.g. [q_proj, v_proj]."
            )
        return self

    def with_target(self, target_compression_ratio: float) -> TrainConfig:
        """A copy with ``cr_end`` filled in from the model's target ratio when unset."""
        if self.cr_end is not None:
            return self
        if target_compression_ratio < self.cr_start:
            raise ValueError(
                f"dms.target_compression_ratio ({target_compression_ratio}) must be >= train.cr_start "
                f"({self.cr_start})"
            )
        return self.model_copy(update={"cr_end": float(target_compression_ratio)})
