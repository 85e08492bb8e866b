"""llama2: the whole Llama 2 system in one package.

The public names are imported lazily, so `llama2 --help` and light commands start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import ModelConfig
from .errors import Llama2Error

_LAZY = {
    "Transformer": "llama2.model",
    "load_model": "llama2.checkpoint",
    "save_model": "llama2.checkpoint",
    "load_config": "llama2.checkpoint",
    "load_checkpoint": "llama2.checkpoint",
    "save_checkpoint": "llama2.checkpoint",
    "SequenceClassifier": "llama2.classifier",
    "apply_lora": "llama2.lora",
    "merge_lora": "llama2.lora",
    "Tokenizer": "llama2.tokenizer",
    "encode_dialog": "llama2.chat",
    "encode_dialog_for_training": "llama2.chat",
    "Generator": "llama2.inference.generate",
    "SamplingParams": "llama2.inference.generate",
    "Completion": "llama2.inference.generate",
    "Engine": "llama2.inference.engine",
    "Request": "llama2.inference.engine",
    "sequence_logprobs": "llama2.inference.scoring",
    "gathered_for_generation": "llama2.inference.sharded",
}

__all__ = ["ModelConfig", "Llama2Error", *_LAZY]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llama2' has no attribute {name!r}")
