"""Subprocess helper of tests/test_training.py: train a fixed tiny DMS model, optionally data parallel.

Builds ``tiny_model("llama", seed=0)`` with DMS (window 4), a fixed set of random token sequences,
and runs :func:`modelopt_dms.training.trainer.train` into ``--out``. At the end rank 0 writes the
final adapter weights (every parameter whose name contains ``dms_adapter``) to ``--final`` with
safetensors. Launched by ``torch.distributed.run`` (``WORLD_SIZE > 1``) it joins a process group first
(gloo on CPU, NCCL with ``--device cuda``), as ``modelopt_dms.pipelines.train.run_recipe`` does.

``--sleep`` slows every step down (so that a test can SIGKILL the run between checkpoints); it does
not change any number the run computes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import modelopt_dms as dms  # noqa: E402
from modelopt_dms.training import trainer as trainer_mod  # noqa: E402
from modelopt_dms.training.devices import close_process_group, init_process_group, resolve_device  # noqa: E402

N_SEQ, SEQ_LEN, VOCAB = 16, 32, 128


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and data every worker (and the in-process tests) share."""
    model = dms.apply_dms(tiny_model("llama", seed=seed), {"window_size": 4})
    gen = torch.Generator().manual_seed(1000 + seed)
    seqs = torch.randint(0, VOCAB, (N_SEQ, SEQ_LEN), generator=gen)
    return model, seqs


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = model.named_parameters()
    return {n: p.detach().cpu().clone().contiguous() for n, p in named if "dms_adapter" in n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--final", default=None, help="default: OUT/final_adapters.safetensors")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--cr-end", type=float, default=4.0)
    ap.add_argument("--anneal-steps", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep at the start of each step")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="shard the model over the processes (FSDP2)")
    ap.add_argument("--unfused-kl", action="store_true", help="full logits + chunked KL (what FSDP uses)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun: cuda:LOCAL_RANK, NCCL)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    device = resolve_device(args.device)
    world, rank = init_process_group(device)  # gloo on CPU, NCCL on CUDA, nothing alone

    if args.sleep > 0:
        real_set_step = trainer_mod.set_step

        def slow_set_step(model, step, rows=None):
            time.sleep(args.sleep)
            real_set_step(model, step, rows=rows)

        trainer_mod.set_step = slow_set_step

    model, seqs = build()
    model.to(device)
    cfg = trainer_mod.TrainConfig(
        steps=args.steps,
        lr=args.lr,
        grad_accum=args.grad_accum,
        batch_size=args.batch_size,
        cr_start=1.0,
        cr_end=args.cr_end,
        anneal_steps=args.anneal_steps,
        checkpoint_every=args.checkpoint_every,
        fsdp=args.fsdp,
        fused_kl=not args.unfused_kl,
    )
    history = trainer_mod.train(model, seqs, cfg, args.out, resume=not args.no_resume, progress=False)
    if rank == 0:
        final = args.final or os.path.join(args.out, "final_adapters.safetensors")
        save_file(adapter_state(model), final)
        print(json.dumps({"steps_logged": len(history), "final": final}), flush=True)
    if world > 1:
        del model, history  # the FSDP model's DTensors hold the process group's mesh
        close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
