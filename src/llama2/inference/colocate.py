"""`rollout_engine: vllm` with `vllm_mode: colocate`: vLLM inside the stage's own process (as TRL's
`vllm_mode="colocate"` and OpenRLHF's and verl's hybrid engines run it), not a server: `vllm.LLM` generates the
rollouts, and after every policy update the trainer hands it the new weights in memory.

- **Engine**: `vllm.LLM` on the starting checkpoint, in the checkpoint's dtype (vLLM's default would run a
  float32 checkpoint in half precision), built with `VLLM_ENABLE_V1_MULTIPROCESSING=0`, so that its
  engine core and its one worker run in this process (no engine subprocess): weights pass as tensors, not
  through files or sockets. Building it (vLLM seeds the global random generators) leaves this process's random
  states as they were.
- **Requests**: token ids in, token ids out (`LLM.generate` with `{"prompt_token_ids": ...}`), one request per
  answer with its own seed (`seeded`), all in one call (vLLM batches them); stop ids and ignore_eos as
  `VllmServer` sends them; a trailing stop id is dropped and the text decoded with our tokenizer, so an answer
  reads as our engine's `Completion`.
- **Weights**: `load_state(named)` streams (our name, tensor) pairs into the worker's `reload_weights` (vLLM's
  in-place reload: its model's `load_weights`, then its post-load processing such as the CPU's weight
  repacking) through `LLM.collective_rpc`, then clears the prefix cache. Nothing is written to disk; under FSDP2
  the pairs come from `gathered_state`, one tensor gathered at a time as vLLM consumes it. `load_weights(DIR)`
  reloads from a Hugging Face checkpoint directory instead (rejection sampling's policies are checkpoints).
- **Memory** (CUDA): the engine is built with `enable_sleep_mode` and `gpu_memory_utilization`; after every
  `generate` it sleeps (level 1: its weights to CPU memory, its KV cache freed) so that training has the GPU,
  and it wakes before loading weights or generating. On the CPU vLLM has no sleep mode: its weights and KV cache
  (`VLLM_CPU_KVCACHE_SPACE` GiB) stay allocated beside the trainer's.
- Under torchrun every process builds its own engine on its own device (a whole copy of the policy; vLLM's
  tensor parallelism across the trainer's processes, `distributed_executor_backend="external_launcher"`, is not
  built).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import Llama2Error
from ..tokenizer import decode_after
from .sampling import Completion, SamplingParams


class VllmColocated:
    """vLLM in this process as the rollout engine (module docstring); the interface of `VllmServer`."""

    def __init__(self, checkpoint: Path | str, tokenizer: Any, *, device: torch.device | str = "cpu",
                 max_model_len: int | None = None, gpu_memory: float = 0.3, dtype: str | None = None,
                 seed: int = 0) -> None:
        """dtype: vLLM's (None: the checkpoint's own; vLLM's "auto" would run a float32 checkpoint in half
        precision, and its greedy answers would no longer be the policy's)."""
        path = Path(checkpoint).resolve()
        if not (path / "config.json").is_file():
            raise Llama2Error(f"{path} is not a Hugging Face checkpoint directory (no config.json) to start vLLM on")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
        try:
            from vllm import LLM
        except ImportError as e:
            raise Llama2Error(f"vllm_mode=colocate needs vLLM in this environment ({e}); `pip install vllm` (on the "
                              "CPU: bash benchmarks/setup_vllm.sh), or use vllm_mode=server") from None
        self.tokenizer = tokenizer
        self.cuda = torch.device(device).type == "cuda"
        # send each answer's seed; vllm-cpu 0.32's server fails on seeded requests in large batches ("CPU
        # Generator does not use offset"), so a CPU engine may need seeded = False (see VllmServer.seeded)
        self.seeded = True
        if dtype is None:
            from ..checkpoint.hf import config_dtype, read_json

            declared = config_dtype(read_json(path / "config.json"))
            dtype = str(declared).removeprefix("torch.") if declared is not None else "auto"
        kwargs: dict[str, Any] = {"dtype": dtype, "seed": seed, "enable_prefix_caching": True}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if self.cuda:
            kwargs.update(enable_sleep_mode=True, gpu_memory_utilization=gpu_memory)
        states = _random_states()
        try:
            self.llm = LLM(str(path), **kwargs)
        finally:
            _restore_random_states(states)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.asleep = False

    # ------------------------------------------------------------ memory (CUDA)

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.llm.reset_prefix_cache()
            self.asleep = False

    def sleep(self) -> None:
        """Release the GPU memory (level 1: weights to CPU memory, KV cache dropped); a no-op on the CPU."""
        if self.cuda and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    # ------------------------------------------------------------ generation

    def _params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VllmParams

        if params.tools is not None:
            raise Llama2Error("tool calls run in our engine only: set rollout_engine=ours for a recipe with tools")
        kw: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
                              "top_p": params.top_p, "skip_special_tokens": True}
        if params.stop_ids == []:  # no stop id: run to max_new_tokens, as our engine does
            kw["ignore_eos"] = True
        elif params.stop_ids:
            kw["stop_token_ids"] = list(params.stop_ids)
        if self.seeded and params.temperature > 0 and params.seed is not None:
            kw["seed"] = int(params.seed) % 2**63
        return VllmParams(**kw)

    def _prompt(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        ids = list(prompt)
        if params.truncate and len(ids) >= self.max_model_len:  # keep the BOS and the last tokens, as ours does
            ids = ids[:1] + ids[len(ids) - self.max_model_len + 2:]
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """One completion per prompt (params: one for all, or one per prompt), in order."""
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise Llama2Error(f"{len(prompts)} prompts but {len(per)} sampling parameters")
        if not prompts:
            return []
        ids = [self._prompt(p, q) for p, q in zip(prompts, per)]
        self.wake()
        try:
            outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], [self._params(q) for q in per],
                                     use_tqdm=False)
        finally:
            self.sleep()
        done = []
        for prompt, q, out in zip(ids, per, outs):
            choice = out.outputs[0]
            tokens = list(choice.token_ids)
            stops = {self.tokenizer.eos_id, *(q.stop_ids or [])}
            if tokens and choice.finish_reason == "stop" and tokens[-1] in stops:
                tokens.pop()
            reason = "stop" if choice.finish_reason == "stop" else "length"
            done.append(Completion(prompt, tokens, decode_after(self.tokenizer, prompt, tokens), None, reason))
        return done

    # ------------------------------------------------------------ weights

    def load_state(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in memory: `named` yields (our parameter name, tensor), each passed to vLLM
        under its Hugging Face name (the whole model's; vLLM converts dtype and device); then the prefix cache,
        which holds keys and values of the old weights, is cleared."""
        from ..checkpoint.hf import hf_name

        self.wake()
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": ((hf_name(n), t) for n, t in named)})
        self.llm.reset_prefix_cache()

    def load_weights(self, checkpoint: Path | str) -> None:
        """Reload the weights from a Hugging Face checkpoint directory (vLLM reads it), then clear the prefix
        cache."""
        path = Path(checkpoint).resolve()
        if not (path / "config.json").is_file():
            raise Llama2Error(f"{path} is not a Hugging Face checkpoint directory (no config.json) to load into vLLM")
        self.wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.sleep()


def _random_states() -> tuple[Any, ...]:
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_random_states(states: tuple[Any, ...]) -> None:
    import numpy as np

    py, npy, cpu, cuda = states
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


__all__ = ["VllmColocated"]
