"""The export pipeline shared by ``modelopt-dms run`` and ``modelopt-dms export``.

It owns the ordering rule: the ONNX step graph is floating point, so it is written *before*
quantization; then optional FP8 quantization (calibrated on real text); then the unified Hugging
Face checkpoint, written last because the exporter needs the quantizers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..corpus import PYTHON_DOCS_GLOB, build_token_sequences
from ..export.adapters import check_adapters, load_adapters
from ..export.hf_checkpoint import check_export_target, export_hf_checkpoint
from ..export.onnx import check_onnx_target, export_onnx
from ..loading import load_model
from ..model_dms import apply_dms, quantize_fp8
from ..outputs import check_free_space, user_path

__all__ = ["ExportPlan", "check_export_space", "export_model", "run_export_plan"]


@dataclass
class ExportPlan:
    """What to write: any of an ONNX step graph, FP8 quantization, a unified HF checkpoint."""

    onnx_path: str | None = None
    quantize_weights: bool = False
    quantize_kv: bool = False
    hf_dir: str | None = None
    overwrite: bool = False

    @property
    def quantizes(self) -> bool:
        """True if the plan quantizes the model (weights and/or KV cache)."""
        return self.quantize_weights or self.quantize_kv


def check_export_space(model: nn.Module, plan: ExportPlan) -> None:
    """Refuse before any heavy work if the plan's folders lack room for the model's weights."""
    need = int(sum(p.numel() * p.element_size() for p in model.parameters()) * 1.1) + (1 << 20)
    if plan.hf_dir:
        check_free_space(user_path(plan.hf_dir).parent, need, "Export target")
    if plan.onnx_path:
        check_free_space(user_path(plan.onnx_path).parent, need, "ONNX target")


def run_export_plan(
    model: nn.Module,
    tokenizer: Any,
    plan: ExportPlan,
    calib_batches: Callable[[], list[torch.Tensor]] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, dict[str, Any]]:
    """Carry out ``plan`` on ``model``; returns the (possibly quantized) model and what was written.

    ``calib_batches`` is called only if the plan quantizes (it may tokenise a corpus).
    """
    check_export_space(model, plan)
    out: dict[str, Any] = {}
    if plan.onnx_path:
        export_onnx(model, plan.onnx_path, overwrite=plan.overwrite)
        log(f"[export] ONNX step graph -> {plan.onnx_path}")
        out["onnx_path"] = plan.onnx_path
    if plan.quantizes:
        if calib_batches is None:
            raise ValueError("FP8 quantization needs calibration batches")
        calib = calib_batches()
        log(
            f"[quantize] FP8 weights={plan.quantize_weights} kv_cache={plan.quantize_kv}, "
            f"{len(calib)} calibration sequences"
        )
        model = quantize_fp8(model, calib, weights=plan.quantize_weights, kv_cache=plan.quantize_kv)
        out["quantized"] = {
            "weights": "fp8" if plan.quantize_weights else "none",
            "kv_cache": "fp8" if plan.quantize_kv else "none",
        }
    if plan.hf_dir:
        export_hf_checkpoint(model, plan.hf_dir, tokenizer=tokenizer, overwrite=plan.overwrite)
        log(f"[export] unified HF checkpoint -> {plan.hf_dir}")
        out["hf_dir"] = plan.hf_dir
    return model, out


def export_model(
    model_name: str,
    out: str,
    adapters: str | None = None,
    window: int = 64,
    quantize: str = "none",
    calib_glob: str = PYTHON_DOCS_GLOB,
    calib_sequences: int = 16,
    onnx: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``modelopt-dms export``: model (+ trained adapters) -> [ONNX] -> [FP8] -> unified HF checkpoint.

    ``quantize`` is ``none``, ``fp8`` (weights, inputs and KV cache) or ``fp8-kv`` (KV cache only).
    """
    check_export_target(out, overwrite)  # destinations and inputs first: loading and calibration are slow
    if onnx:
        check_onnx_target(onnx, overwrite)
    if adapters:
        check_adapters(adapters)
    log(f"[export] {model_name} -> {out}")
    model, tok = load_model(model_name)
    if adapters:
        load_adapters(model, adapters)
    else:
        model = apply_dms(model, {"window_size": window})
        log("[export] no --adapters given: exporting untrained DMS heads (they evict nothing)")
    plan = ExportPlan(
        onnx_path=onnx,
        quantize_weights=quantize == "fp8",
        quantize_kv=quantize in ("fp8", "fp8-kv"),
        hf_dir=out,
        overwrite=overwrite,
    )

    def calib() -> list[torch.Tensor]:
        rows = build_token_sequences(tok, calib_glob, 256, "train", max_sequences=calib_sequences)
        return [rows[i : i + 1] for i in range(rows.shape[0])]

    _, written = run_export_plan(model, tok, plan, calib_batches=calib, log=log)
    return written
