"""`llama2 demo` end to end on a fresh cache: every stage it shows runs and its checks hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_runs_end_to_end_from_a_fresh_cache(tmp_path):
    env = {**os.environ, "LLAMA2_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "llama2", "demo", "--out", str(out), "--steps", "3", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "weights identical after the round trip: True" in r.stdout
    for heading in ("1. Pretraining", "2. Generating", "3. The Llama 2 chat format", "4. Checkpoint formats"):
        assert heading in r.stdout
    ckpt = out / "pretrain" / "checkpoints" / "step-000003"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.model").is_file()
    steps = [json.loads(line)["step"] for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[-1] == 3
    assert sorted(p.name for p in (out / "meta").iterdir()) == ["consolidated.00.pth", "consolidated.01.pth",
                                                                "params.json"]
