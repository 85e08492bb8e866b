"""Generating from an FSDP2-sharded policy on 2 CPU processes (torchrun, gloo): inside gathered_for_generation the
greedy output equals the unsharded model's, and the number of all-gathers does not grow with the number of
generated tokens (counted by wrapping the collective FSDP2 calls); outside it, it does. Training still works
after (the weights are sharded again)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama2.config import ModelConfig
from llama2.inference.generate import Generator, SamplingParams, gathered_for_generation, sequence_logprobs
from llama2.model import Transformer
from llama2.train.distributed import init_distributed, shard_model, shutdown

env = init_distributed("cpu")
torch.manual_seed(0)
cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=172, max_seq_len=64)
model = Transformer(cfg)
plain = Transformer(cfg)
plain.load_state_dict(model.state_dict())
plain.eval()


class Tok:
    bos_id, eos_id = 1, 2

    def decode(self, ids):
        return " ".join(map(str, ids))


calls = {"n": 0}
for name in ("all_gather_single", "all_gather_into_tensor", "all_gather"):
    if hasattr(dist, name):
        original = getattr(dist, name)

        def counting(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counting)


def gathers(fn):
    before = calls["n"]
    out = fn()
    return out, calls["n"] - before


prompts = [[1, 5, 9, 200, 31], [1, 77, 3]]
greedy = lambda n: SamplingParams(temperature=0.0, max_new_tokens=n, stop_ids=[])
want = {n: [c.tokens for c in Generator(plain, Tok(), fast_fp32=False).generate(prompts, greedy(n))] for n in (4, 12)}

shard_model(model, env)
model.eval()
gen = Generator(model, Tok())
result = {"rank": env.rank}
_, result["sharded_4"] = gathers(lambda: gen.generate(prompts, greedy(4)))
_, result["sharded_12"] = gathers(lambda: gen.generate(prompts, greedy(12)))
context = gathered_for_generation(model)
_, result["entry"] = gathers(context.__enter__)  # one all-gather per FSDP module, once
try:
    out4, result["gathered_4"] = gathers(lambda: gen.generate(prompts, greedy(4)))
    out12, result["gathered_12"] = gathers(lambda: gen.generate(prompts, greedy(12)))
    result["unsharded_inside"] = not isinstance(model.lm_head.weight, DTensor)
finally:
    context.__exit__(None, None, None)
result["equal"] = [c.tokens for c in out4] == want[4] and [c.tokens for c in out12] == want[12]
result["tokens"] = [c.tokens for c in out12]
result["sharded_after"] = isinstance(model.layers[0].self_attn.q_proj.weight, DTensor)
# training after the rollout: policy logprobs with gradients through the sharded model
model.train()
lp = sequence_logprobs(model, torch.tensor(prompts[0])[None])
lp.sum().backward()
g = model.layers[0].self_attn.q_proj.weight.grad
result["grad_ok"] = g is not None and bool(torch.isfinite(g.full_tensor()).all())
with open(sys.argv[1] + f".{env.rank}", "w") as f:
    json.dump(result, f)
shutdown()
'''


@pytest.mark.slow
def test_sharded_policy_generates_with_weights_gathered_once(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    out = tmp_path / "result"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for res in results:
        assert res["equal"], res
        # per-token all-gathers without the context: more tokens, more all-gathers
        assert res["sharded_12"] > res["sharded_4"] > 0
        # inside it: none at all while generating, however many tokens
        assert res["gathered_4"] == res["gathered_12"] == 0
        assert 0 < res["entry"] <= 2 * 4  # 3 blocks + the root, gathered once on entry
        assert res["unsharded_inside"] and res["sharded_after"] and res["grad_ok"]
    assert results[0]["tokens"] == results[1]["tokens"]
