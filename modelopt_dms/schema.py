"""Shared pieces of the YAML recipe schemas (training recipes and evaluation recipes).

A recipe is a YAML mapping of sections; every section is a pydantic model that rejects unknown
keys, and every problem is reported as ``section.key: message`` in one :class:`RecipeError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["ModelSection", "RecipeError", "Section", "format_validation_error", "load_yaml_recipe"]

R = TypeVar("R", bound=BaseModel)


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the key path and the fix."""


class Section(BaseModel):
    """A recipe section: unknown keys are errors; an empty section (``train:``) means defaults."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return {} if value is None else value


class ModelSection(Section):
    """Which model to load, in which dtype, on which device.

    ``name_or_path`` goes to ``modelopt_dms.load_model`` (a known name, a local HF folder or a
    .gguf); ``device`` ``auto`` is CUDA when available (under torchrun each rank takes
    ``cuda:LOCAL_RANK``).
    """

    name_or_path: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")


def format_validation_error(err: ValidationError, prefix: str = "") -> list[str]:
    """One ``path: message`` line per problem of a pydantic error."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = "unknown key (check the spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {prefix}{path}: {msg}")
    return lines


def load_yaml_recipe(path: str | Path, schema: type[R], required: tuple[str, ...], kind: str) -> R:
    """Read ``path`` and validate it as ``schema``; the ``required`` sections must be present."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"Recipe {path} is not valid YAML: {err}") from err
    sections = ", ".join(schema.model_fields)
    if raw is None:
        raise RecipeError(
            f"Recipe {path} is empty: a {kind} recipe names its sections ({sections}) explicitly; "
            "see recipes/ for examples."
        )
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe {path} must be a mapping of sections ({sections}); see recipes/.")
    missing = [s for s in required if s not in raw]
    if missing:
        raise RecipeError(
            f"Recipe {path} has no {', '.join(missing)} section(s): a {kind} recipe names them "
            f"explicitly (an empty section means defaults); see recipes/ for examples."
        )
    try:
        return schema(**{k: ({} if v is None else v) for k, v in raw.items()})
    except ValidationError as err:
        raise RecipeError("\n".join([f"Invalid recipe {path}:", *format_validation_error(err)])) from None
