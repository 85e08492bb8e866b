"""What one section of the demo hands the later ones: small typed records of the models and data it made.

    data (built first) -> BuiltData
    pretrain  -> Pretrained            (generate, chat, sft, evaluation, formats take it)
    sft       -> ChatModel             (reward, rejection; the fallback start of GAtt and safety)
    reward    -> RewardModels          (rejection, ppo, safety, evaluation's judges)
    rejection -> Policy (V2)           (ppo)
    ppo       -> Policy                (gatt)
    gatt      -> Policy                (safety)
    safety    -> Policy (the final model)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...train.config import PretrainRecipe


@dataclass(frozen=True)
class BuiltData:
    """The data every section reads, built (or found in the cache) before the first section, and what it cost."""

    recipe: PretrainRecipe  # the demo's pretraining recipe (its data.build points at `root`)
    root: Path | None  # the corpus, tokenizer and shards (None: the recipe reads prepared shards)
    stats: dict[str, Any]  # the corpus build's statistics (corpus/stats.json)
    pretrain_cached: bool  # the corpus, tokenizer and shards were in the cache already
    pretrain_s: float  # seconds building them took (0 when cached)
    seconds: float  # seconds every build took (dialogues, comparisons and prompts included)

    @property
    def corpus_dir(self) -> Path | None:
        return self.root / "corpus" if self.root is not None else None

    @property
    def val_file(self) -> Path | None:
        """The corpus's held-out documents (val.jsonl), when there is a corpus."""
        return self.corpus_dir / "val.jsonl" if self.corpus_dir is not None else None


@dataclass(frozen=True)
class Pretrained:
    """The pretrained model: its checkpoint (the tokenizer saved beside the weights) and the held-out text."""

    checkpoint: Path
    tokenizer: Path  # the tokenizer the shards were prepared with
    val_file: Path | None  # the corpus's held-out documents (None: no corpus was built)


@dataclass(frozen=True)
class ChatModel:
    """The supervised fine-tuned chat model."""

    checkpoint: Path


@dataclass(frozen=True)
class RewardModels:
    """The two reward models, both started from the chat model."""

    helpfulness: Path
    safety: Path


@dataclass(frozen=True)
class Policy:
    """A chat model that an RLHF stage produced (`stage` says which: rejection, ppo, gatt, safety)."""

    checkpoint: Path
    stage: str


Model = Pretrained | ChatModel | Policy  # anything with a checkpoint to answer with
