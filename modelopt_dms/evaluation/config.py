"""Evaluation recipes: the ``eval:`` section of ``modelopt-dms eval`` and the press names it accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..corpus import DEFAULT_HELDOUT_FRACTION, PYTHON_DOCS_GLOB
from ..schema import ModelSection, Section, load_yaml_recipe

__all__ = ["PRESS_NAMES", "EvalConfig", "EvalRecipe", "load_eval_recipe"]

# kvpress presses by short name (modelopt_dms.evaluation.methods.make_press builds them).
PRESS_NAMES = ("streaming_llm", "snapkv", "tova", "knorm", "expected_attention", "keydiff", "dms_press")


class EvalConfig(Section):
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
    rounds: int = Field(24, ge=1, le=1000)  # one sample of every cell per round: 24 pass keys per length
    time_budget_min: float | None = Field(None, gt=0.0)
    press_window: int = Field(64, ge=0)
    calib_sequences: int = Field(8, ge=1, le=4096)
    text_glob: str = PYTHON_DOCS_GLOB
    heldout_fraction: float = Field(DEFAULT_HELDOUT_FRACTION, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1)
    out_dir: str = "benchmarks/results/comparison"

    @model_validator(mode="after")
    def _check_labels(self) -> EvalConfig:
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
        for ctx in (
            *self.fidelity_contexts,
            *self.needle_contexts,
            *self.multi_needle_contexts,
            *self.multi_turn_contexts,
        ):
            if ctx < 128:
                raise ValueError(f"context length {ctx} is too short (>= 128 tokens)")
        return self


class EvalRecipe(Section):
    """A side-by-side evaluation recipe: which model, and the ``eval`` section."""

    model: ModelSection = ModelSection()
    eval: EvalConfig = EvalConfig()


def load_eval_recipe(path: str | Path) -> EvalRecipe:
    """Read and validate an evaluation recipe; errors name each bad key path."""
    return load_yaml_recipe(path, EvalRecipe, required=("eval",), kind="evaluation")
