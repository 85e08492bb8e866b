"""lm-evaluation-harness on our model: `Llama2LM`, an implementation of lm-eval's `LM` interface
(`loglikelihood`, `loglikelihood_rolling`, `generate_until`) over the project's scorer and generator, and
`run_lm_eval`, which runs lm-eval's tasks (its registry, or YAML files under an include path) through it.

Tokenisation follows lm-eval's `hf` model for a Llama tokenizer, so the two agree request by request: a context
is encoded with BOS and the continuation is encode(context + continuation) minus the context's tokens (trailing
spaces of the context moved to the continuation); an empty context is BOS alone. Rolling log-likelihoods encode
the text without BOS and predict it from BOS in disjoint windows of the model's context (the `hf` model with
add_bos_token=False does the same; by default it also scores a BOS it prepends to the text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import Llama2Error
from ..inference.generate import Generator
from ..inference.sampling import SamplingParams
from .harness import Settings, encode_pair, existing_checkpoint, load_for_eval
from .loglikelihood import Scorer


def _lm_base() -> type:
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise Llama2Error("--harness lm-eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4,<0.5'") from None
    return LM


def make_adapter(model: Any, tokenizer: Any, *, batch_size: int = 16, max_gen_toks: int = 256) -> Any:
    """A Llama2LM (an lm_eval.api.model.LM) over a loaded Transformer and its tokenizer."""
    LM = _lm_base()

    class Llama2LM(LM):
        """lm-eval's LM interface on a llama2 Transformer (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.scorer = Scorer(model, batch_size=batch_size)
            self.max_gen_toks = max_gen_toks
            self.batch_size = batch_size
            self._generator = None
            self._ctx: dict[str, list[int]] = {}

        @property
        def tokenizer_name(self) -> str:
            return "llama2-sentencepiece"

        def _pairs(self, requests: list[Any]) -> list[tuple[list[int], list[int]]]:
            out = []
            for context, continuation in (r.args[:2] for r in requests):
                if context == "":
                    cont = self.tokenizer.encode(continuation, bos=False)
                    out.append(([self.tokenizer.bos_id], cont))
                else:
                    out.append(encode_pair(self.tokenizer, context, continuation, self._ctx))
            return out

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self.scorer.loglikelihood(self._pairs(requests))

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            docs = [self.tokenizer.encode(r.args[0], bos=False) for r in requests]
            return self.scorer.rolling(docs, self.tokenizer.bos_id, context_len=1)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            if self._generator is None:
                self._generator = Generator(self.model, self.tokenizer, max_batch_size=batch_size)
            prompts, params = [], []
            for context, kw in (r.args[:2] for r in requests):
                kw = dict(kw or {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                sample = bool(kw.get("do_sample")) and float(kw.get("temperature", 1.0)) > 0
                params.append(SamplingParams(
                    temperature=float(kw.get("temperature", 1.0)) if sample else 0.0, top_p=float(kw.get("top_p", 1.0)),
                    max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)), stop=until, truncate=True,
                    seed=0))
                prompts.append(self.tokenizer.encode(context, bos=True))
            return [c.text for c in self._generator.generate(prompts, params)]

    return Llama2LM()


def run_lm_eval(checkpoint: Path | str, tasks: list[str], *, include_path: Path | None = None,
                limit: int | None = None, shots: int | None = None, batch_size: int = 16, device: str = "auto",
                dtype: str = "auto") -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of the tasks on our model; the report has our shape: results {task:
    {metric: value}} (lm-eval's "acc,none" keys as "acc"; standard errors left out), plus lm-eval's configs."""
    _lm_base()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise Llama2Error(f"--include-path {include_path} is not a directory of lm-eval task YAML files")
    ckpt = existing_checkpoint(checkpoint)
    model, tokenizer = load_for_eval(ckpt, Settings(device=device, dtype=dtype))
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise Llama2Error(f"lm-eval does not know the task(s) {', '.join(unknown)}; give --include-path DIR with "
                          "their YAML files (lm-eval lists its own with `lm-eval --tasks list`)")
    out = simple_evaluate(model=make_adapter(model, tokenizer, batch_size=batch_size), tasks=tasks,
                          num_fewshot=shots, limit=limit, task_manager=manager, bootstrap_iters=0)
    return {"checkpoint": str(ckpt), "harness": "lm-eval", "results": lm_eval_metrics(out["results"]),
            "groups": {}, "settings": {"limit": limit, "shots": shots, "batch_size": batch_size,
                                       "include_path": str(include_path) if include_path else None}}


def lm_eval_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's {task: {"acc,none": v, "acc_stderr,none": e, "alias": ...}} -> {task: {"acc": v}}."""
    out = {}
    for task, metrics in results.items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k}
    return out
