"""Evaluation of DMS models against the uncompressed model and training-free presses.

One stack: ``tasks`` makes the samples, ``methods`` runs a cache strategy on them, ``metrics`` scores
them (KL from ``modelopt_dms.nn``), ``harness`` runs the side-by-side comparison and ``report``
renders it; ``fidelity`` and ``retrieval`` are the single-model views the demo and the heads
evaluation use.
"""

from .fidelity import FidelityResult, fidelity_on_text
from .retrieval import passkey_accuracy, passkey_samples

__all__ = ["FidelityResult", "fidelity_on_text", "passkey_accuracy", "passkey_samples"]
