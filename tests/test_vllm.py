"""vLLM as a tested peer: one of our checkpoints served by `llama2 serve` and by vLLM's `vllm serve` (the CPU build,
in its own virtual environment, `.venv-vllm`, made by benchmarks/setup_vllm.sh, which `./run test` runs), both asked
the same greedy questions by the same openai-client script (examples/openai_client.py), answer the same text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2.checkpoint import save_model
from llama2.config import ModelConfig
from llama2.model import Transformer

from helpers import free_port, stop, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM = Path(os.environ.get("LLAMA2_VLLM_VENV", ROOT / ".venv-vllm")) / "bin"
NAME = "tiny-chat"

pytestmark = pytest.mark.slow


def ask(url: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_client.py"), "--base-url", url + "/v1",
                          "--model", NAME], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sp_model_path):
    """A random tiny model (head_dim 64: vLLM's CPU attention has no kernel for 16) whose logits are far apart (its
    head scaled up), so that greedy choices do not hinge on the order of floating-point sums; saved as a Hugging Face
    checkpoint with the tests' tokenizer."""
    from llama2.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=32, vocab_size=1000,
                                    max_seq_len=256)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    path = tmp_path_factory.mktemp("vllm") / NAME
    save_model(model, path, Tokenizer(sp_model_path))
    return path


def test_vllm_serves_our_checkpoint_with_the_same_greedy_answers(checkpoint):
    """The commands docs/serving.md gives (vLLM's OpenAI server with `--model CKPT --served-model-name NAME`, and
    `llama2 serve CKPT --model-name NAME`); the client script's chat and completion answers are equal, text, finish
    reason and token counts."""
    assert (VLLM / "python").exists(), (
        f"vLLM is not installed in {VLLM.parent}; run `bash benchmarks/setup_vllm.sh` (./run test does it)")
    vport, port = free_port(), free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    # `vllm serve` itself, in the CPU build (installed as vllm-cpu), stops at looking up the package "vllm"
    vllm = subprocess.Popen([str(VLLM / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
                             str(checkpoint), "--served-model-name", NAME, "--max-model-len", "256", "--dtype",
                             "float32", "--host", "127.0.0.1", "--port", str(vport)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    ours = subprocess.Popen([sys.executable, "-m", "llama2", "serve", str(checkpoint), "--model-name", NAME,
                             "--port", str(port), "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_healthy(ours, f"http://127.0.0.1:{port}", 120, "llama2 serve")
        wait_healthy(vllm, f"http://127.0.0.1:{vport}", 600, "vllm serve")
        theirs, mine = ask(f"http://127.0.0.1:{vport}"), ask(f"http://127.0.0.1:{port}")
    finally:
        stop(vllm)
        stop(ours)
    assert sum(a["completion_tokens"] for a in mine["chat"] + mine["completions"]) > 60  # answers, not empty ones
    # One known difference: an answer cut by max_tokens in the middle of a UTF-8 character (the random model writes
    # byte pieces) ends in U+FFFD with us, as decoding its tokens gives (SentencePiece, transformers), while vLLM's
    # detokenizer leaves the incomplete character out. Everything before it must be equal.
    assert cut_tails(mine) == cut_tails(theirs), json.dumps({"ours": mine, "vllm": theirs}, ensure_ascii=True,
                                                            indent=1)


def cut_tails(answers: dict) -> dict:
    """The answers with the U+FFFD of a character cut by the length limit removed from their ends."""
    out = {}
    for kind, items in answers.items():
        field = "content" if kind == "chat" else "text"
        out[kind] = [{**a, field: a[field].rstrip("\ufffd") if a["finish_reason"] == "length" else a[field]}
                     for a in items]
    return out
