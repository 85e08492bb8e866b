"""Running our side and a peer's side of a benchmark each in its own subprocess (the same script with
`--worker NAME`), with the same threads, and collecting what each printed as its `RESULT {json}` line."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_sides(script: str, work: Path, passthrough: list[str], threads: int, only: str | None,
              names: tuple[str, ...] = ("ours", "trl")) -> dict[str, dict[str, Any]]:
    """{name: result} for each side that finished (a failure prints its output tails and is left out)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for name in names:
        if only and name != only:
            continue
        out = subprocess.run([sys.executable, script, "--worker", name, "--work", str(work), *passthrough],
                             capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            continue
        results[name] = json.loads(line[len("RESULT "):])
    return results


def emit(result: dict[str, Any]) -> None:
    """A worker's result line, with its peak resident memory (ru_maxrss) added."""
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(args: Any, sides: dict[str, Any], load: Any) -> None:
    """The `--worker NAME` process: torch threads and seed set, the prepared data read by load(work dir),
    sides[NAME](args, data, work) run, its result emitted."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.work)
    emit(sides[args.worker](args, load(work), work))


def step_clock(times: list[float]) -> Any:
    """A transformers TrainerCallback appending each optimiser step's seconds (on_step_begin to on_step_end) to
    `times` (what the Trainer does around the step, data loading included, falls outside)."""
    import time

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        start = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.start)

    return Clock()


class TRLRolloutClock:
    """Wraps a TRL online trainer's `_generate` (tokenise + generate + decode) and
    `_generate_and_score_completions` to time each rollout; also records the prompts' token ids and the mean
    answer length. parts(step_times) splits each optimiser step's seconds into generate, score and update."""

    def __init__(self, trainer: Any) -> None:
        import statistics
        import time

        self.generate_s: list[float] = []
        self.rollout_s: list[float] = []
        self.lengths: list[float] = []
        self.prompt_ids: list[list[int]] = []
        generate, gen_and_score = trainer._generate, trainer._generate_and_score_completions

        def timed_generate(prompts):
            s = time.perf_counter()
            out = generate(prompts)
            self.generate_s.append(time.perf_counter() - s)
            self.prompt_ids.extend(list(p) for p in out[0])
            self.lengths.append(statistics.fmean(len(c) for c in out[1]))
            return out

        def timed_rollout(inputs):
            s = time.perf_counter()
            out = gen_and_score(inputs)
            self.rollout_s.append(time.perf_counter() - s)
            return out

        trainer._generate = timed_generate
        trainer._generate_and_score_completions = timed_rollout

    def parts(self, step_times: list[float]) -> dict[str, list[float]]:
        k = len(step_times)
        return {"generate": self.generate_s[:k],
                "score": [b - a for a, b in zip(self.generate_s, self.rollout_s)][:k],
                "update": [t - b for t, b in zip(step_times, self.rollout_s)]}
