"""The one version string of modelopt-dms (pyproject.toml reads it)."""

__version__ = "0.1.0"
