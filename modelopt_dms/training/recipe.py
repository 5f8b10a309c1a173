"""Training recipes: one validated YAML file that says how to retrofit, train, quantize and export."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import DMSConfig
from ..corpus import DEFAULT_CACHE_DIR, DEFAULT_HELDOUT_FRACTION, PYTHON_DOCS_GLOB
from ..schema import ModelSection, Section, load_yaml_recipe
from .config import TrainConfig

__all__ = [
    "DataSection",
    "ExportSection",
    "OutputSection",
    "QuantizeSection",
    "TrainRecipe",
    "load_train_recipe",
]


class DataSection(Section):
    """Real text, tokenised into single-document sequences (cached on disk).

    ``text_glob`` names one source; ``sources`` mixes several by weight (rows for one-document
    sequences, tokens for packing), each split into train/held-out by its own files.

    ``chat_fraction`` / ``recall_fraction`` / ``multi_turn_fraction`` of the rows become
    chat-formatted continuation / recall / multi-turn recall conversations (instruct models; see
    ``training.chat_data``).
    """

    text_glob: str = PYTHON_DOCS_GLOB  # a named source (text_sources.SOURCES) or a glob of files
    sources: dict[str, float] | None = None  # a mixture instead: source name or glob -> weight
    seq_len: int = Field(256, ge=8, le=65536)
    heldout_fraction: float = Field(DEFAULT_HELDOUT_FRACTION, gt=0.0, lt=1.0)
    max_sequences: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    cache_dir: str = DEFAULT_CACHE_DIR
    chat_fraction: float = Field(0.0, ge=0.0, le=1.0)
    recall_fraction: float = Field(0.0, ge=0.0, le=1.0)
    multi_turn_fraction: float = Field(0.0, ge=0.0, le=1.0)  # the fact in an earlier user turn
    packing: bool = False  # pack whole documents into rows (block-diagonal attention, no document dropped)

    @model_validator(mode="after")
    def _check_fractions(self) -> DataSection:
        if self.chat_fraction + self.recall_fraction + self.multi_turn_fraction > 1.0:
            raise ValueError(
                f"chat_fraction ({self.chat_fraction}) + recall_fraction ({self.recall_fraction}) "
                f"+ multi_turn_fraction ({self.multi_turn_fraction}) must be at most 1"
            )
        if self.sources is not None:
            if "text_glob" in self.model_fields_set:
                raise ValueError("set data.sources or data.text_glob, not both")
            bad = {k: w for k, w in self.sources.items() if not w > 0}
            if not self.sources or bad:
                raise ValueError(f"data.sources needs at least one source with a weight > 0, got {bad or {}}")
        if self.packing and (self.chat_fraction or self.recall_fraction or self.multi_turn_fraction):
            raise ValueError(
                "packing does not combine with chat_fraction / recall_fraction / multi_turn_fraction "
                "yet; use one"
            )
        return self


class QuantizeSection(Section):
    """FP8 post-training quantization after DMS (weights+inputs and/or KV cache)."""

    weights: Literal["fp8", "none"] = "fp8"
    kv_cache: Literal["fp8", "none"] = "fp8"
    calib_sequences: int = Field(16, ge=1, le=4096)


class ExportSection(Section):
    """Deployable outputs written at the end of a run."""

    hf_dir: str | None = None
    onnx_path: str | None = None
    overwrite: bool = False


class OutputSection(Section):
    """Where the run writes its checkpoint, log and adapters."""

    dir: str = "runs/dms"
    adapters_dir: str | None = None

    @property
    def adapters_path(self) -> Path:
        """The adapters folder: ``adapters_dir``, else ``<dir>/adapters``."""
        return Path(self.adapters_dir) if self.adapters_dir else Path(self.dir) / "adapters"


class TrainRecipe(Section):
    """A complete DMS retrofit recipe (``modelopt-dms run``)."""

    model: ModelSection = ModelSection()
    dms: DMSConfig = DMSConfig()
    data: DataSection = DataSection()
    train: TrainConfig = TrainConfig()
    quantize: QuantizeSection | None = None
    export: ExportSection | None = None
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _check_target(self) -> TrainRecipe:
        self.train.with_target(self.dms.target_compression_ratio)  # raises if below cr_start
        if self.train.train_all_weights and not (self.export and self.export.hf_dir):
            raise ValueError(
                "train.train_all_weights: true changes the base weights, which the adapters artifact "
                "does not hold (loaded on the original model it would compute something else): set "
                "export.hf_dir to save the whole trained model"
            )
        return self

    @property
    def schedule(self) -> TrainConfig:
        """``train`` with ``cr_end`` defaulting to ``dms.target_compression_ratio``."""
        return self.train.with_target(self.dms.target_compression_ratio)


def load_train_recipe(path: str | Path) -> TrainRecipe:
    """Read and validate a training recipe; errors name each bad key path (``dms.window_size``)."""
    return load_yaml_recipe(path, TrainRecipe, required=("model", "dms", "train"), kind="training")
