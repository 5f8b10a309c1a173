"""YAML recipes: one validated file that says how to retrofit, train and save a DMS model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import DMSConfig
from .evaluation.methods import PRESS_NAMES

__all__ = ["EvalSection", "Recipe", "RecipeError", "load_recipe"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return {} if value is None else value


class ModelSection(_Section):
    """Which model to retrofit."""

    name_or_path: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "float32"


class DataSection(_Section):
    """Real text, tokenised into single-document sequences (cached on disk).

    ``chat_fraction`` / ``recall_fraction`` of the rows become chat-formatted continuation /
    recall conversations (instruct models; see ``training.chat_data``).
    """

    text_glob: str = "/usr/share/doc/python3*/html/_sources/**/*.rst.txt"
    seq_len: int = Field(256, ge=8, le=65536)
    heldout_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_sequences: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    cache_dir: str = ".cache/modelopt_dms/data"
    chat_fraction: float = Field(0.0, ge=0.0, le=1.0)
    recall_fraction: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_fractions(self) -> DataSection:
        if self.chat_fraction + self.recall_fraction > 1.0:
            raise ValueError(
                f"chat_fraction ({self.chat_fraction}) + recall_fraction ({self.recall_fraction}) "
                "must be at most 1"
            )
        return self


class TrainSection(_Section):
    """Optimisation schedule (see TrainConfig)."""

    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    grad_accum: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)
    cr_start: float = Field(1.0, ge=1.0)
    cr_end: float = Field(8.0, ge=1.0)
    anneal_steps: int = Field(150, ge=0)
    compression_weight: float = Field(1.0, ge=0.0)
    kl_direction: Literal["forward", "reverse"] = "forward"
    train_all_weights: bool = False
    autocast_bf16: bool = False
    fsdp: bool = False  # shard the model over the torchrun processes (FSDP2); else data parallel
    checkpoint_every: int = Field(50, ge=0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainSection:
        if self.cr_end < self.cr_start:
            raise ValueError(f"cr_end ({self.cr_end}) must be >= cr_start ({self.cr_start})")
        return self


class QuantizeSection(_Section):
    """FP8 post-training quantization after DMS (weights+inputs and/or KV cache)."""

    weights: Literal["fp8", "none"] = "fp8"
    kv_cache: Literal["fp8", "none"] = "fp8"
    calib_sequences: int = Field(16, ge=1, le=4096)


class ExportSection(_Section):
    """Deployable outputs written at the end of a run."""

    hf_dir: str | None = None
    onnx_path: str | None = None
    overwrite: bool = False




class EvalSection(_Section):
    """Side-by-side evaluation: uncompressed vs DMS vs kvpress presses (``modelopt-dms eval``).

    ``adapters`` maps a budget label to trained DMS adapters; every press runs at every budget of
    ``budgets`` (nominal compression ratio), matched per sample to the kept tokens of the DMS
    model of the same label when there is one.
    """

    adapters: dict[str, str] = Field(default_factory=dict)
    fp8_kv: list[str] = Field(default_factory=list)
    presses: list[Literal[PRESS_NAMES]] = Field(default_factory=lambda: list(PRESS_NAMES))  # type: ignore[valid-type]
    budgets: dict[str, float] = Field(default_factory=lambda: {"cr4": 4.0, "cr8": 8.0})
    fidelity_contexts: list[int] = Field(default_factory=lambda: [2048])
    continuation_tokens: int = Field(64, ge=2, le=4096)
    needle_contexts: list[int] = Field(default_factory=lambda: [1024, 2048, 4096, 8192])
    needle_depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9], min_length=1)
    multi_needle_contexts: list[int] = Field(default_factory=lambda: [1024])
    n_needles: int = Field(3, ge=2, le=5)
    multi_turn_contexts: list[int] = Field(default_factory=lambda: [1024])
    rounds: int = Field(3, ge=1, le=1000)
    time_budget_min: float | None = Field(None, gt=0.0)
    press_window: int = Field(64, ge=0)
    calib_sequences: int = Field(8, ge=1, le=4096)
    text_glob: str = "/usr/share/doc/python3*/html/_sources/**/*.rst.txt"
    heldout_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1)
    out_dir: str = "benchmarks/results/comparison"

    @model_validator(mode="after")
    def _check_labels(self) -> EvalSection:
        for label in self.adapters:
            if label not in self.budgets:
                raise ValueError(f"adapters label {label!r} has no entry in budgets {sorted(self.budgets)}")
        for label in self.fp8_kv:
            if label not in self.adapters:
                raise ValueError(f"fp8_kv label {label!r} is not an adapters label {sorted(self.adapters)}")
        for label, cr in self.budgets.items():
            if cr < 1.0:
                raise ValueError(f"budgets.{label} = {cr}: a compression ratio must be >= 1")
        for depth in self.needle_depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"needle_depths entry {depth} must be in [0, 1]")
        for ctx in (*self.fidelity_contexts, *self.needle_contexts, *self.multi_needle_contexts,
                    *self.multi_turn_contexts):
            if ctx < 128:
                raise ValueError(f"context length {ctx} is too short (>= 128 tokens)")
        return self


class OutputSection(_Section):
    """Where the run writes its checkpoint, log and adapters."""

    dir: str = "runs/dms"
    adapters_dir: str | None = None


class Recipe(_Section):
    """A complete DMS retrofit recipe."""

    model: ModelSection = ModelSection()
    dms: dict[str, Any] = Field(default_factory=dict)
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    quantize: QuantizeSection | None = None
    export: ExportSection | None = None
    eval: EvalSection | None = None
    output: OutputSection = OutputSection()

    def dms_config(self) -> DMSConfig:
        """The validated DMS mode config of this recipe."""
        return DMSConfig(**self.dms)


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the key path and the fix."""


def _format(err: ValidationError, source: str) -> str:
    lines = [f"Invalid recipe {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = "unknown key (check the spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe; errors name each bad key path."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"Recipe {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(
            f"Recipe {path} must be a mapping of sections "
            "(model, dms, data, train, quantize, export, eval, output)."
        )
    raw = {k: ({} if v is None else v) for k, v in raw.items()}
    problems: list[str] = []
    recipe = None
    try:
        recipe = Recipe(**raw)
    except ValidationError as err:
        problems += _format(err, str(path)).splitlines()[1:]
    if isinstance(raw.get("dms"), dict):
        try:
            DMSConfig(**raw["dms"])
        except ValidationError as err:
            problems += [line.replace("  ", "  dms.", 1) for line in _format(err, str(path)).splitlines()[1:]]
    if problems or recipe is None:
        raise RecipeError("\n".join([f"Invalid recipe {path}:", *problems]))
    return recipe
