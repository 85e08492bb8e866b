"""Many LoRA adapters served beside their base model in the same batches, against PEFT: adapters written by PEFT
itself (`save_pretrained`), and each request's greedy tokens and log-probabilities equal to PEFT's model with that
one adapter (transformers' `generate` and full forward), whatever else shares its batch."""

from __future__ import annotations

import pytest
import torch

from llama2.errors import Llama2Error
from llama2.inference.engine import Engine
from llama2.inference.generate import Generator, SamplingParams
from helpers import SERVE_KEY, SERVE_NAME, TEXTS, greedy_pair, hf_greedy, start_server

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 5
GREEDY = dict(temperature=0.0, stop_ids=[])
ADAPTERS = {  # name -> PEFT LoraConfig fields (without task_type PEFT writes null)
    "sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "poet": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
                 use_rslora=True, task_type="CAUSAL_LM"),
}


def peft_model(directory=None, name: str | None = None):
    """The transformers base of greedy_pair(SEED), with `name`'s adapter: created (random lora_B, so the adapter
    changes the output) and saved by PEFT into directory, or, with directory=None, loaded from there."""
    from peft import LoraConfig, PeftModel, get_peft_model

    hf, _ = greedy_pair(SEED)
    if name is None:
        return hf
    if (directory / name / "adapter_config.json").exists():
        return PeftModel.from_pretrained(hf, directory / name).eval()
    m = get_peft_model(hf, LoraConfig(**ADAPTERS[name]))
    torch.manual_seed(len(name))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    m.save_pretrained(directory / name)
    return m.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    models = {name: peft_model(d, name) for name in ADAPTERS}
    models[None] = peft_model()
    return d, models


@pytest.fixture(scope="module")
def base():
    return greedy_pair(SEED)[1]


def oracle_logprobs(m, ids: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = m(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("fast_fp32,stacked", [(False, True), (True, True), (False, False)],
                         ids=["torch", "kernels", "grouped"])
def test_mixed_batch_equals_peft_with_each_adapter(adapters, base, tok, fast_fp32, stacked, monkeypatch):
    """Base and adapter requests in one engine (the same prompt under three adapters, requests joining midway):
    every request's greedy tokens are PEFT's with its adapter, and its log-probabilities PEFT's to 1e-4. Mixed
    batches through the stacked adapters, and through one adapter at a time (what many adapters take)."""
    from llama2.inference.adapters import MultiLoRALinear

    if not stacked:
        monkeypatch.setattr(MultiLoRALinear, "STACK_LIMIT", 0.0)
    d, models = adapters
    gen = Generator(base, tok, max_batch_size=6, fast_fp32=fast_fp32, adapters={n: d / n for n in ADAPTERS})
    prompts = [tok.encode(t) for t in TEXTS]
    jobs = [(prompts[0], None), (prompts[0], "sql"), (prompts[0], "poet"), (prompts[1], "sql"), (prompts[2], None),
            (prompts[3], "poet"), (prompts[1], "poet"), (prompts[3], None)]
    params = [SamplingParams(max_new_tokens=5 + i, logprobs=True, adapter=a, **GREEDY) for i, (_, a) in
              enumerate(jobs)]
    out = gen.generate([p for p, _ in jobs], params)  # 8 requests through 6 slots: two join as others finish
    for (p, a), q, c in zip(jobs, params, out):
        assert c.tokens == hf_greedy(models[a], p, q.max_new_tokens), (a, p)
        torch.testing.assert_close(torch.tensor(c.logprobs), oracle_logprobs(models[a], p, c.tokens),
                                   atol=1e-4, rtol=1e-4)
    assert out[0].tokens != out[1].tokens or out[0].tokens != out[2].tokens  # the adapters change the answer


def test_shared_prompts_and_prefix_cache_keep_adapters_apart(adapters, base, tok):
    """K copies of one prompt under different adapters join in one step, and a later prompt extends one that was
    cached under another adapter: nothing computed with one adapter is reused for another."""
    d, models = adapters
    gen = Generator(base, tok, max_batch_size=4, fast_fp32=False, prefix_cache=256,
                    adapters={n: d / n for n in ADAPTERS})
    p = tok.encode(" ".join([TEXTS[3], TEXTS[1], TEXTS[0]]))
    assert len(p) > 16  # at least one cached block
    first = gen.generate([p] * 4, [SamplingParams(max_new_tokens=6, adapter=a, **GREEDY)
                                   for a in (None, "sql", None, "poet")])
    for c, a in zip(first, (None, "sql", None, "poet")):
        assert c.tokens == hf_greedy(models[a], p, 6), a
    longer = p + first[0].tokens + tok.encode(" and", bos=False)
    for a in ("poet", None, "sql"):
        got = gen.generate([longer], SamplingParams(max_new_tokens=6, adapter=a, **GREEDY))[0]
        assert got.tokens == hf_greedy(models[a], longer, 6), a
    assert gen.engine().prefix_cache.hits >= 3


def test_bad_adapters_are_refused_with_one_clear_error(adapters, base, tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    from conftest import random_hf_llama

    d, _ = adapters
    gen = Generator(base, tok, fast_fp32=False, adapters={"sql": d / "sql"})
    with pytest.raises(Llama2Error, match="no LoRA adapter named 'nope' is loaded .loaded: sql"):
        gen.generate([[1, 2]], SamplingParams(adapter="nope", max_new_tokens=4))
    with pytest.raises(Llama2Error, match="already loaded"):
        gen.adapters.load("sql", d / "poet")
    with pytest.raises(Llama2Error, match="no LoRA adapters loaded"):
        Generator(base, tok).generate([[1, 2]], SamplingParams(adapter="sql", max_new_tokens=4))
    other = get_peft_model(random_hf_llama(seed=1, vocab_size=1000, hidden_size=32, num_attention_heads=2,
                                           num_key_value_heads=2), LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(Llama2Error, match="the base it was trained on"):
        gen.adapters.load("other", tmp_path / "other")
    head = get_peft_model(greedy_pair(SEED)[0], LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head.save_pretrained(tmp_path / "head")
    with pytest.raises(Llama2Error, match="modules_to_save.*llama2 lora merge"):
        gen.adapters.load("head", tmp_path / "head")
    assert list(gen.adapters.names) == ["sql"]  # the failed loads changed nothing
    with pytest.raises(Llama2Error, match="compile cannot be combined"):
        Generator(base, tok, compile="eager", adapters={})
    with pytest.raises(Llama2Error, match="AdapterBank's model"):
        Engine(base, tok, adapters=gen.adapters)


def test_server_lists_adapters_and_batches_them_with_base_requests(adapters, base, tok):
    """`/v1/models` lists the adapters with their parent; requests naming an adapter (through the openai client,
    concurrently with base requests) answer PEFT's greedy text; an unknown model is a 404 naming what is served."""
    import concurrent.futures

    import httpx
    import openai

    d, models = adapters
    ids = tok.encode(TEXTS[1])
    want = {a: tok.decode(ids + hf_greedy(models[a], ids, 8))[len(tok.decode(ids)):] for a in (None, "sql", "poet")}
    assert len(set(want.values())) == 3
    auth = {"Authorization": f"Bearer {SERVE_KEY}"}
    with start_server(base, tok, adapters={n: d / n for n in ADAPTERS}) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=SERVE_KEY, max_retries=0)
        listed = client.models.list().data
        assert [m.id for m in listed] == [SERVE_NAME, "poet", "sql"]
        assert listed[2].model_extra["parent"] == SERVE_NAME and listed[2].model_extra["root"] == str(d / "sql")
        names = ["sql", SERVE_NAME, "poet", "sql", SERVE_NAME, "poet"]

        def ask(name: str):
            return client.completions.create(model=name, prompt=ids, max_tokens=8, temperature=0).choices[0]

        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            answers = list(pool.map(ask, names))
        for name, a in zip(names, answers):
            expected = want[None if name == SERVE_NAME else name]
            if a.finish_reason == "stop":  # EOS or a chat tag came first: the text is a prefix
                assert expected.startswith(a.text), name
            else:
                assert a.text == expected, name
        r = httpx.post(s.url + "/v1/completions", headers=auth, json={"model": "nope", "prompt": "hi"})
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and "'sql'" in err["message"]
        assert httpx.get(s.url + "/v1/models/sql", headers=auth).json()["parent"] == SERVE_NAME


def test_serve_command_checks_its_adapters(tmp_path, adapters):
    from llama2.commands.serve import adapter_options

    d, _ = adapters
    assert adapter_options([["a=" + str(d / "sql")], ["b=" + str(d / "poet")]]) == {"a": d / "sql",
                                                                                  "b": d / "poet"}
    for bad, message in [(["sql"], "takes NAME=PATH"), ([f"a={d / 'sql'}", f"a={d / 'poet'}"], "twice"),
                         ([f"a={tmp_path}"], "not a LoRA adapter directory")]:
        with pytest.raises(Llama2Error, match=message):
            adapter_options([bad])
