"""Shared pieces of the YAML recipe schemas (training recipes and evaluation recipes).

A recipe is a YAML mapping of sections; every section is a pydantic model that rejects unknown
keys, and every problem is reported as ``section.key: message`` in one :class:`RecipeError`.

A recipe may start from another one with ``base: <file>`` (a path relative to the recipe's own
folder): the base is read first (it may have a base of its own), then each section the recipe
names overrides the base's section key by key (an empty section overrides nothing). A key's value
replaces the base's whole, mappings such as ``data.sources`` included, and ``null`` replaces too
(``init_adapters: null`` drops a warm start). What is validated, fingerprinted and recorded is the
merged recipe; its errors name the base chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ModelSection",
    "RecipeError",
    "Section",
    "format_validation_error",
    "load_yaml_recipe",
    "read_recipe_mapping",
]

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


def _merge_sections(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: sections merge key by key; every value (mappings too) replaces."""
    merged = dict(base)
    for name, section in child.items():
        inherited = merged.get(name)
        if section is None and name in merged:  # an empty section (`train:`) overrides nothing
            continue
        if isinstance(section, dict) and isinstance(inherited, dict):
            merged[name] = {**inherited, **section}
        else:
            merged[name] = section
    return merged


def read_recipe_mapping(path: str | Path) -> Any:
    """The YAML of ``path`` with its ``base:`` chain merged in (not validated; see the module doc)."""
    return _read_with_bases(Path(path), ())[0]


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[Any, list[Path]]:
    """The merged YAML of ``path`` and the bases it was merged from (nearest first)."""
    if not path.is_file():
        where = f" (the base of {chain[-1]})" if chain else ""
        raise RecipeError(f"Recipe file not found: {path}{where}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"Recipe {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict) or "base" not in raw:
        return raw, []
    base_name = raw.pop("base")
    if not isinstance(base_name, str) or not base_name.strip():
        raise RecipeError(f"Recipe {path}: base must be the path of another recipe file, got {base_name!r}")
    base_path = (path.parent / base_name).resolve()
    seen = (*chain, path.resolve())
    if base_path in seen:
        loop = " -> ".join(str(p) for p in (*seen, base_path))
        raise RecipeError(f"Recipe {path}: its base chain loops ({loop}); remove one base: key")
    base, bases = _read_with_bases(base_path, seen)
    if not isinstance(base, dict):
        raise RecipeError(f"Recipe {base_path} (the base of {path}) must be a mapping of sections")
    return _merge_sections(base, raw), [base_path, *bases]


def load_yaml_recipe(path: str | Path, schema: type[R], required: tuple[str, ...], kind: str) -> R:
    """Read ``path`` (and its ``base:`` chain) and validate it as ``schema``.

    The ``required`` sections must be present in the recipe or one of its bases.
    """
    path = Path(path)
    raw, bases = _read_with_bases(path, ())
    named = f"{path} (on base {' <- '.join(str(b) for b in bases)})" if bases else str(path)
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
            f"Recipe {named} has no {', '.join(missing)} section(s): a {kind} recipe names them "
            f"explicitly (an empty section means defaults); see recipes/ for examples."
        )
    try:
        return schema(**{k: ({} if v is None else v) for k, v in raw.items()})
    except ValidationError as err:
        raise RecipeError("\n".join([f"Invalid recipe {named}:", *format_validation_error(err)])) from None
