"""Shared fixtures: a real SentencePiece tokenizer with the Llama 2 settings, the real Llama 2 vocabulary
from llama-cpp-python's sdist, random transformers models, and token shards with a tiny pretraining recipe.
Plain helpers shared by test modules are in helpers.py."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import CACHE, write_token_shards  # plain helpers live in helpers.py (CACHE: also `from conftest`)

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


def corpus_text(max_chars: int = 400_000) -> str:
    """Real English text present on every machine: pydoc_data topics."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return text[:max_chars]


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    """A 1000-piece SentencePiece BPE model trained with the Llama 2 settings (directly, not through llama2)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text(corpus_text())
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=1000,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        num_threads=1,
    )
    out = d / "tokenizer.model"
    assert out.exists()
    return out


@pytest.fixture(scope="module")
def tok(sp_model_path):
    """llama2's Tokenizer over the test SentencePiece model."""
    from llama2.tokenizer import Tokenizer

    return Tokenizer(sp_model_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP barriers stall for ms
    (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama_cpp_sdist_dir() -> Path:
    """llama-cpp-python's sdist, downloaded once from PyPI and unpacked into the test cache."""
    import fcntl

    target = CACHE / "llama_cpp_python-0.3.36"
    if (target / ".done").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:  # pytest-xdist workers: one downloads, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".done").exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            LLAMA_CPP_SDIST, "-d", str(CACHE)], check=True)
            with tarfile.open(CACHE / "llama_cpp_python-0.3.36.tar.gz") as tar:
                tar.extractall(CACHE, filter="data")
            (target / ".done").touch()
    return target


@pytest.fixture(scope="session")
def llama_vocab_gguf() -> Path:
    """The real 32,000-piece Llama 2 vocabulary (GGUF, no weights) with llama.cpp's .inp/.out test strings."""
    path = llama_cpp_sdist_dir() / "vendor" / "llama.cpp" / "models" / "ggml-vocab-llama-spm.gguf"
    assert path.exists(), path
    return path


def random_hf_llama(seed: int = 0, **kw):
    """A random transformers LlamaForCausalLM (fp32, eval mode) of a tiny shape; kw are LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**base)).eval()


FRUIT = ["apple", "banana", "cherry", "date", "elder", "fig", "grape", "kiwi", "lemon", "mango", "plum", "pear"]


def fruit_policy(d: Path, sp_model_path: Path, cfg, words: int) -> Path:
    """A tiny policy for the RLHF tests: a random model of shape `cfg` fine-tuned (60 SFT steps) to answer "Name
    some fruit" with `words` random fruit words, so its samples differ in how many of each letter they hold and
    a programmatic reward has something to select. Returns the SFT run directory (d / "policy"); the random
    model is at d / "random"."""
    import random

    import torch

    from llama2.checkpoint import save_model
    from llama2.model import Transformer
    from llama2.stages.sft import SFTRecipe, sft
    from llama2.tokenizer import Tokenizer
    from llama2.recipe import load_recipe

    torch.manual_seed(0)
    save_model(Transformer(cfg), d / "random", Tokenizer(sp_model_path))
    rng = random.Random(0)
    dialogues = [[{"role": "user", "content": f"Name some fruit, please ({i})."},
                  {"role": "assistant", "content": " ".join(rng.choice(FRUIT) for _ in range(words))}]
                 for i in range(200)]
    sft(load_recipe(SFTRecipe, None, [f"base={d / 'random'}", f"out_dir={d / 'policy'}", "max_seq_len=96",
                                      "batch_size=8", "max_steps=60", "device=cpu", "precision=fp32", "optim.lr=1e-2",
                                      "optim.warmup_steps=5", "samples.count=0", "peak_tflops=1", "save_every=0"]),
        quiet=True, dialogues=dialogues)
    return d / "policy"


# ------------------------------------------------------------------------------------------------ pretraining data


@pytest.fixture(scope="module")
def tok_dir(sp_model_path, tmp_path_factory) -> Path:
    """A directory holding the test tokenizer's files (tokenizer.model, tokenizer_config.json)."""
    from llama2.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    Tokenizer(sp_model_path).save(d)
    return d


@pytest.fixture(scope="module")
def shards(tok_dir, tmp_path_factory) -> Path:
    """Real text (pydoc topics) tokenised with the 1000-piece tokenizer; the last 8 documents are the val split."""
    import numpy as np
    from pydoc_data.topics import topics

    from llama2.tokenizer import Tokenizer

    tok = Tokenizer(tok_dir)
    docs = [np.array(tok.encode(topics[k], bos=True, eos=True)) for k in sorted(topics)]
    return write_token_shards(tmp_path_factory.mktemp("shards"), {"train": docs[:-8], "val": docs[-8:]},
                              tok.sha256, tok.vocab_size)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, shards, tok_dir) -> Path:
    """A tiny pretraining recipe over `shards` (context 32, batch 4, 6 steps)."""
    path = tmp_path_factory.mktemp("recipe") / "pretrain.yaml"
    path.write_text(f"""
model: {{preset: tiny, max_seq_len: 32}}
data:
  tokenizer: {tok_dir}
  sources: [{{path: {shards}}}]
  eval_sequences: 8
optim: {{lr: 3.0e-3, warmup_steps: 2}}
batch_size: 4
max_steps: 6
log_every: 1
""")
    return path
