#!/usr/bin/env bash
# The GPU checks as one script (random weights; no model hub needed). On one H200 (2026-12-04) the steps took
# about 8.5 minutes before the two batch-4 steps (+~2 min) and the GraphDecoder runs (--graphs, about +1 min)
# were added. Under a 10-minute runner, two calls:
#   ONLY="environment cuda-tests bench-cache-8b-b1 bench-cache-8b-b4 bench-cache-8b-b4-chunk4k" scripts/gpu_check.sh
#   ONLY="bench-cache-8b-b32 profile-decode bench-train trainer-cpu trainer-cuda trainer-compare" scripts/gpu_check.sh
#
# Here (with PyPI):   scripts/fetch_gpu_wheels.sh      # the packages the GPU image lacks, into .whl/
# On the GPU machine: scripts/gpu_check.sh [OUTDIR]     # OUTDIR defaults to $OUT, else gpu_check_out/
#
# 1. tests/test_cuda.py: the batched cache (fp32/bf16/FP8, both layouts) against the masked reference,
#    decode steps without host syncs, the trainer with the flex kernel and the fused KL, LoRA in bf16;
# 2. the trainer on CUDA (one process) against the same run on CPU; NCCL data parallel with 2+ GPUs;
# 3. benchmarks/bench_cache.py: a Llama-3.1-8B-shaped model (bf16) at 8K context, batch 1, 4 and 32,
#    DMS (eager, and through GraphDecoder: decode steps replayed from CUDA graphs) vs DynamicCache/StaticCache
#    with SDPA (and prefill chunks of 4096 at batch 4);
#    benchmarks/profile_decode.py: kernels per decode step;
# 4. benchmarks/bench_train_gpu.py: SmolLM2-shaped trainer steps at 2K and 8K, eager vs flex + fused KL.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
RAW="$OUTDIR/raw"  # the benchmarks' json/md/png, packed into results.tgz at the end (the device tool returns 8 files)
mkdir -p "$RAW"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PY=${PY:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

status=0
step() {  # step NAME TIMEOUT_S CMD...: run, log, remember failures, go on (only the steps in $ONLY, if set)
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc $rc in $((SECONDS - t0))s" | tee -a "$LOG"
  [ "$rc" = 0 ] || status=1
}

step environment 45 "$PY" -c "import torch, transformers, modelopt, modelopt_dms as d; \
print(torch.__version__, torch.cuda.get_device_name(), transformers.__version__, modelopt.__version__, d.__version__)"

step cuda-tests 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py

# The benchmarks run one batch size per process, so a slow batch-32 run cannot cost the batch-1 numbers.
CACHE_ARGS=(--model tiny-llama-8b-shape --device cuda --dtype bfloat16 --contexts 8192 --decode-tokens 16
            --window 256 --chunk 1024 --block-size 256)
step bench-cache-8b-b1 95 "$PY" benchmarks/bench_cache.py "${CACHE_ARGS[@]}" --graphs --batches 1 --repeats 3 \
  --out "$RAW/cache_gpu_b1.json"
step bench-cache-8b-b4 95 "$PY" benchmarks/bench_cache.py "${CACHE_ARGS[@]}" --graphs --batches 4 --repeats 2 \
  --out "$RAW/cache_gpu_b4.json"
# prefill in larger chunks (the 1024-token chunks gave 0.44-0.79x of dense prefill on 2026-12-04)
step bench-cache-8b-b4-chunk4k 70 "$PY" benchmarks/bench_cache.py "${CACHE_ARGS[@]}" --batches 4 --repeats 2 \
  --chunk 4096 --out "$RAW/cache_gpu_b4_chunk4096.json"
step bench-cache-8b-b32 140 "$PY" benchmarks/bench_cache.py "${CACHE_ARGS[@]}" --graphs --batches 32 --repeats 1 \
  --out "$RAW/cache_gpu_b32.json"
step profile-decode 60 "$PY" benchmarks/profile_decode.py --layers 4 --batches 1 32 --context 8192 \
  --out "$RAW/profile_decode.json"
step bench-train 130 "$PY" benchmarks/bench_train_gpu.py --seqs 2048 8192 --steps 12 --out "$RAW/train_gpu.json"

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
W=$(mktemp -d)
step trainer-cpu 60 "$PY" tests/train_worker.py --out "$W/cpu" --steps 8 --checkpoint-every 0 --grad-accum 2
step trainer-cuda 90 "$PY" tests/train_worker.py --out "$W/cuda" --steps 8 --checkpoint-every 0 --grad-accum 2 \
  --device cuda
if [ "$GPUS" -ge 2 ]; then
  step trainer-nccl 120 "$PY" -m torch.distributed.run --nproc_per_node=2 tests/train_worker.py --out "$W/nccl" \
    --steps 8 --checkpoint-every 0 --device cuda
fi
step trainer-compare 15 "$PY" - "$W" "$RAW/trainer_devices.json" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
root, out = Path(sys.argv[1]), Path(sys.argv[2])
ref = load_file(root / "cpu" / "final_adapters.safetensors")
res = {}
for run in ("cuda", "nccl"):
    f = root / run / "final_adapters.safetensors"
    if f.exists():
        got = load_file(f)
        res[run] = max((got[k] - ref[k]).abs().max().item() for k in ref)
out.write_text(json.dumps({"max_abs_diff_vs_cpu": res}, indent=1))
print(res)
assert all(v <= 1e-3 for v in res.values()), res
EOF

tar czf "$OUTDIR/results.tgz" -C "$OUTDIR" raw && rm -rf "$RAW"
echo "gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL)" | tee -a "$LOG"
exit $status
