"""The ``dms`` Model Optimizer mode: its registry and descriptor (entrypoints in ``conversion.py``)."""

from __future__ import annotations

from modelopt.torch.opt.config import ModeloptBaseConfig
from modelopt.torch.opt.mode import (
    ConvertEntrypoint,
    ModeDescriptor,
    RestoreEntrypoint,
    UpdateEntrypoint,
    _ModeRegistryCls,
)

from .config import DMSConfig
from .conversion import convert_to_dms, restore_dms, update_dms_metadata

__all__ = ["DMSModeDescriptor", "DMSModeRegistry"]

DMSModeRegistry = _ModeRegistryCls("dms")


@DMSModeRegistry.register_mode
class DMSModeDescriptor(ModeDescriptor):
    """Dynamic Memory Sparsification: learned, delayed KV-cache eviction."""

    @property
    def name(self) -> str:
        """Mode name used in ``mto.apply_mode(model, [("dms", cfg)])``."""
        return "dms"

    @property
    def config_class(self) -> type[ModeloptBaseConfig]:
        """The pydantic config class of the mode."""
        return DMSConfig

    @property
    def next_prohibited_modes(self) -> set[str] | None:
        """Modes that may not follow ``dms``."""
        return {"sparse_attention"}  # "dms" twice is caught by convert with a clearer message

    @property
    def convert(self) -> ConvertEntrypoint:
        """Entrypoint that converts a model."""
        return convert_to_dms

    @property
    def restore(self) -> RestoreEntrypoint:
        """Entrypoint that restores a converted model."""
        return restore_dms

    @property
    def update_for_save(self) -> UpdateEntrypoint:
        """Entrypoint run before the modelopt state is saved."""
        return update_dms_metadata

    @property
    def update_for_new_mode(self) -> UpdateEntrypoint:
        """Entrypoint run before another mode is applied on top."""
        return update_dms_metadata
