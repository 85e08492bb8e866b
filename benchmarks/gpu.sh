#!/usr/bin/env bash
# Everything GPU-only, in one script that fits in 10 minutes on one H100/H200:
#   1. bf16 training throughput and MFU (1B shape, ours against transformers + AdamW, same run)
#   2. 7B-shape batch-1 decode against the HBM bandwidth bound (and transformers' generate)
#   3. FSDP2 over NCCL under torchrun: the tiny pretraining recipe for a few steps, then resume
#   4. each stage's step on CUDA: the tests marked `gpu` (they skip, saying so, on machines without CUDA)
#   5. RLHF rollouts through a vLLM server against our engine, and the weight update's cost (rollout_engine:
#      vllm), when VLLM_PYTHON names a Python with a CUDA vLLM (the machine has no internet to install one)
# Usage (from the repository root, on the GPU machine, with a python that has a CUDA torch):
#   bash benchmarks/gpu.sh [OUT_DIR]          # logs go to OUT_DIR (default: $OUT or ./gpu-results)
# It uses the checkout's sources directly (PYTHONPATH=src): no install step, nothing downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LLAMA2_CACHE="${LLAMA2_CACHE:-/tmp/llama2-cache}"
PY=${PYTHON:-python3}
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to $out/NAME.log, keep going on failure
  local name="$1" limit="$2"; shift 2
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!! $name failed (exit $rc)"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step train_mfu 150 $PY benchmarks/train_throughput.py --device cuda --precision bf16 --sizes 1B --batch 4 \
    --seq 2048 --steps 5 --rounds 2 --no-compile
step decode_7b 150 $PY benchmarks/gpu_decode.py --preset 7B --tokens 128 --repeats 3
run_dir=/tmp/llama2-gpu-fsdp
rm -rf "$run_dir"
step fsdp2_nccl 120 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m llama2 pretrain \
    --config configs/tiny/pretrain.yaml device=cuda max_steps=40 save_every=20 out_dir="$run_dir" --quiet
step fsdp2_resume 60 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m llama2 pretrain \
    --config configs/tiny/pretrain.yaml device=cuda max_steps=60 save_every=20 out_dir="$run_dir" --quiet
if [ -x "${VLLM_PYTHON:-}" ]; then
  step vllm_rollout 240 $PY benchmarks/vllm_rollout.py --device cuda --shape 1.1b --vllm-python "$VLLM_PYTHON"
else
  echo "== vllm_rollout skipped: set VLLM_PYTHON to a Python with vLLM for CUDA"
fi
step stage_steps 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
echo "== done ($(date +%T)), status $status; logs in $out"
exit $status
