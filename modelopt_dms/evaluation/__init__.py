"""Evaluation of DMS models against the uncompressed model: fidelity and retrieval."""

from .fidelity import FidelityResult, fidelity_on_text
from .retrieval import PasskeySample, make_passkey_sample, passkey_accuracy

__all__ = ["FidelityResult", "PasskeySample", "fidelity_on_text", "make_passkey_sample", "passkey_accuracy"]
