"""The OpenAI-compatible server against two oracles: the official `openai` client for the wire format (plain and
streaming) and `Generator.generate` for the tokens (the same prompt and seed give the same output, alone or
batched with other requests). A live uvicorn server on a free loopback port, a tiny random model."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

import httpx  # noqa: E402
import openai  # noqa: E402

from llama2.chat import encode_dialog  # noqa: E402
from llama2.inference.generate import Generator, SamplingParams  # noqa: E402

from helpers import SERVE_CONTEXT as CONTEXT, SERVE_KEY as KEY, SERVE_NAME as NAME  # noqa: E402
from helpers import serve_model, slowed, start_server as start  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return serve_model()


@pytest.fixture(scope="module")
def oracle(model, tok):
    return Generator(model, tok, max_batch_size=4)


@pytest.fixture(scope="module")
def server(model, tok):
    s = start(model, tok)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow_server(model, tok):
    s = slowed(start(model, tok), 0.02)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, *, key: str | None = KEY, raw: bytes | None = None, **headers):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers)
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **h},
                      timeout=60)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(server.url + "/health").json()
        if h["busy_slots"] == 0 and h["queue_depth"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"slots still busy after {timeout}s: {h}")


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def want(oracle, tok, prompt_ids, **params):
    return oracle.generate([prompt_ids], SamplingParams(**params))[0]


# --------------------------------------------------------------------------------- the openai client (format)


def test_chat_plain_equals_generator(client, oracle, tok, server):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=12)
    c = want(oracle, tok, encode_dialog(tok, MESSAGES), temperature=0, max_new_tokens=12)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == c.text
    assert r.choices[0].finish_reason == {"length": "length", "stop": "stop"}[c.finish_reason]
    assert r.usage.prompt_tokens == len(c.prompt_tokens)
    assert r.usage.completion_tokens == len(c.tokens)
    assert r.usage.total_tokens == len(c.prompt_tokens) + len(c.tokens)


def test_chat_stream_equals_plain(client, oracle, tok):
    c = want(oracle, tok, encode_dialog(tok, MESSAGES), temperature=0.9, top_p=0.95, seed=11, max_new_tokens=14)
    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0.9, top_p=0.95, seed=11,
                                            max_tokens=14, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [{"length": "length", "stop": "stop"}[c.finish_reason]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(c.tokens)
    assert chunks[-1].usage.prompt_tokens == len(c.prompt_tokens)
    assert sum(bool(ch.choices and ch.choices[0].delta.content) for ch in chunks) > 1  # token by token


def test_stream_wire_ends_with_done(server):
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and "usage" not in json.loads(events[-2][6:])


def test_completions_plain_and_stream(client, oracle, tok):
    prompt = "The quick brown fox"
    c = want(oracle, tok, tok.encode(prompt), temperature=0, max_new_tokens=10)
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=10)
    assert r.object == "text_completion" and r.choices[0].text == c.text
    assert r.usage.completion_tokens == len(c.tokens)
    parts = list(client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=10, stream=True))
    assert "".join(p.choices[0].text for p in parts) == c.text


def test_n_seed_stop_and_logprobs(client, oracle, tok):
    ids = encode_dialog(tok, MESSAGES)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, n=3, seed=5, temperature=1.0, top_p=1.0,
                                       max_tokens=8, logprobs=True)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for i, ch in enumerate(r.choices):  # choice i samples with seed + i, as Generator.generate does
        c = want(oracle, tok, ids, temperature=1.0, top_p=1.0, seed=5 + i, max_new_tokens=8, logprobs=True)
        assert ch.message.content == c.text
        lps = [t.logprob for t in ch.logprobs.content]
        assert lps == pytest.approx(c.raw_logprobs, abs=1e-5)
        assert "".join(t.token for t in ch.logprobs.content).strip() == tok.decode(c.tokens).strip() or c.text == ""
    assert r.usage.prompt_tokens == len(ids)
    # a stop string cuts the greedy answer right before it
    full = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=16)
    text = full.choices[0].message.content
    if len(text) >= 6:
        stop = text[3:6]
        cut = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=16,
                                             stop=[stop])
        assert cut.choices[0].message.content == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_completions_echo_logprobs(client, oracle, tok):
    prompt = "Return the value of"
    ids = tok.encode(prompt)
    c = want(oracle, tok, ids, temperature=0, max_new_tokens=4, logprobs=True, echo=True)
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=4, echo=True, logprobs=1)
    assert r.choices[0].text == c.text and r.choices[0].text.startswith(prompt)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 4 and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(c.raw_logprobs[1:], abs=1e-5)


def test_completion_text_joins_the_prompt_and_its_offsets_index_it(client, oracle, tok):
    """SentencePiece decoding the whole sequence is the oracle: prompt + text reads as decode(prompt + completion)
    (the first token's leading space kept), the tokens' texts concatenate to the text, text_offset indexes it,
    streamed chunks join to it; with echo the text is the whole sequence's decoding."""
    prompt = "Return the value of"
    ids = tok.encode(prompt)
    c = want(oracle, tok, ids, temperature=0, max_new_tokens=8)
    whole = tok.sp.decode(ids[1:] + c.tokens)
    for echo in (False, True):
        r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8, logprobs=0, echo=echo)
        text, lp = r.choices[0].text, r.choices[0].logprobs
        assert (text if echo else prompt + text) == whole
        assert "".join(lp.tokens) == text
        assert [text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
    stream = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8, stream=True)
    assert prompt + "".join(ch.choices[0].text for ch in stream if ch.choices) == whole


def piece_text(piece: str) -> str:
    """A SentencePiece piece as text inside a completion: U+2581 is a space, a byte piece <0xNN> that byte."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)]).decode("utf-8", "replace")
    return piece.replace("\u2581", " ")


def test_top_logprobs_equal_transformers(client, oracle, tok, model, tmp_path):
    """top_logprobs (prompt positions with echo, and generated ones; completions and chat) are the k most likely
    tokens of transformers' log_softmax at each position, with its values; lm-eval's greedy check (a token's
    logprob equal to its position's best) holds where the token is the argmax."""
    import torch
    from transformers import LlamaForCausalLM

    from llama2 import save_model

    save_model(model, tmp_path / "hf", tok)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = "Return the value of"
    ids = tok.encode(prompt)
    c = want(oracle, tok, ids, temperature=0, max_new_tokens=4)
    seq = ids + c.tokens
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), -1)
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=4, echo=True, logprobs=5)
    lp = r.choices[0].logprobs
    assert lp.top_logprobs[0] is None and len(lp.top_logprobs) == len(seq)
    for pos in range(1, len(seq)):
        values, top = ref[pos - 1].topk(5)
        texts = [piece_text(tok.sp.id_to_piece(int(t))) for t in top]
        got, want_top = lp.top_logprobs[pos], {}
        for text, v in zip(texts, values.tolist()):  # two tokens with one text (say two stray bytes) show once
            want_top.setdefault(text, v)
        assert list(got) == list(want_top) and list(got.values()) == pytest.approx(list(want_top.values()), abs=1e-4)
        assert (lp.token_logprobs[pos] == max(got.values())) == (seq[pos] == int(top[0]))
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=3, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(x.top_logprobs) == 3 for x in content)
    assert content[0].top_logprobs[0].logprob == content[0].logprob  # greedy: the token is the best


def test_penalties_and_logit_bias_follow_openai_s_definition(client, oracle, tok, model, tmp_path):
    """Greedy decoding with logit_bias, presence_penalty and frequency_penalty equals transformers' logits
    adjusted step by step by OpenAI's definition (bias added; each generated token's logit lowered by
    presence + frequency x its count; the prompt does not count)."""
    import torch
    from transformers import LlamaForCausalLM

    from llama2 import save_model

    save_model(model, tmp_path / "hf", tok)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = "Return the value of"
    ids = tok.encode(prompt)
    banned = want(oracle, tok, ids, temperature=0, max_new_tokens=1).tokens[0]
    bias = {banned: -100.0, 500: 3.0}
    stops = {tok.eos_id, *getattr(tok, "tag_ids", ())}
    seq, counts = list(ids), {}
    with torch.no_grad():
        for _ in range(12):
            logits = hf(torch.tensor([seq])).logits[0, -1].float()
            for t, b in bias.items():
                logits[t] += b
            for t, n in counts.items():
                logits[t] -= 1.5 * n + 0.5
            nxt = int(logits.argmax())
            if nxt in stops:
                break
            seq.append(nxt)
            counts[nxt] = counts.get(nxt, 0) + 1
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12, frequency_penalty=1.5,
                                  presence_penalty=0.5, logit_bias={str(k): v for k, v in bias.items()})
    assert prompt + r.choices[0].text == tok.sp.decode(seq[1:])
    assert banned not in seq[len(ids):]
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=5,
                                       logit_bias={"500": 100})
    assert r.choices[0].message.content == piece_text(tok.sp.id_to_piece(500)) * 5


def test_tokenize_and_detokenize(server):
    """vLLM's /tokenize and /detokenize shapes; the SentencePiece model is the oracle."""
    r = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert r["tokens"] == sp_ids(server, "Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT
    plain = post(server, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"]
    assert plain == r["tokens"][1:]
    chat = post(server, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    assert chat == encode_dialog(server.app.state.worker.engine.tokenizer, MESSAGES)
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    error_of(post(server, "/detokenize", {"tokens": [10**6]}), 400)
    error_of(post(server, "/tokenize", {"prompt": 3}), 400)
    error_of(post(server, "/tokenize", {"prompt": "x"}, key=None), 401)


def sp_ids(server, text: str) -> list[int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(server.app.state.worker.engine.tokenizer.model_path))
    return [sp.bos_id(), *sp.encode(text)]


PERSON = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z ]{1,12}$"},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                          "pets": {"type": "array", "items": {"enum": ["cat", "dog", "owl"]},
                                                   "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


def test_structured_output_always_parses_and_validates(client):
    """json_schema through the official client (strict, several seeds and n, sampled from a random model): every
    answer that finished parses and validates against the schema (jsonschema is the oracle); json_object answers
    parse as objects; guided_regex answers match whole."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answers = []
    for seed in range(4):
        r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=1.0, seed=seed, n=4,
                                           max_tokens=80, response_format=fmt)
        answers += [(c.message.content, c.finish_reason) for c in r.choices]
    finished = [a for a, why in answers if why == "stop"]
    assert len(finished) >= 12, answers
    for a in finished:
        jsonschema.validate(json.loads(a), PERSON)
    r = client.completions.create(model=NAME, prompt="A record:", temperature=1.0, seed=3, n=4, max_tokens=80,
                                  extra_body={"response_format": {"type": "json_object"}})
    for c in r.choices:
        assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict), c.text
    pattern = r"(yes|no), [0-9]{1,3} (cats|dogs)\."
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=1.0, seed=5, n=4, max_tokens=30,
                                       extra_body={"guided_regex": pattern})
    for c in r.choices:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.message.content), c.message.content
    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=1.0, seed=6, max_tokens=80,
                                            response_format=fmt, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_concurrent_requests_share_steps_and_match_alone(server, oracle, tok):
    """Several requests at once (greedy and seeded): each equals Generator.generate alone; steps were batched."""
    prompts = ["Name a colour.", "Say hello", "What is 2+2?", "A list of fruits", "Tell me a story"]
    steps0, sum0 = metric(server, "llama2_decode_steps_total"), metric(server, "llama2_batch_size_sum")

    async def main():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        calls = [ac.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}], max_tokens=20,
                                            temperature=0 if i % 2 else 0.8, seed=100 + i)
                 for i, p in enumerate(prompts)]
        try:
            return await asyncio.gather(*calls)
        finally:
            await ac.close()

    results = asyncio.run(main())
    for i, (p, r) in enumerate(zip(prompts, results)):
        ids = encode_dialog(tok, [{"role": "user", "content": p}])
        c = want(oracle, tok, ids, temperature=0 if i % 2 else 0.8, top_p=0.9, seed=100 + i, max_new_tokens=20)
        assert r.choices[0].message.content == c.text, i
    steps = metric(server, "llama2_decode_steps_total") - steps0
    mean_batch = (metric(server, "llama2_batch_size_sum") - sum0) / steps
    assert mean_batch > 1.5  # 5 requests over 4 slots: steps carried several requests


def test_models_health_metrics(client, server):
    # one answered request of our own, so the counters below never depend on which tests ran first on this worker
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 4 and h["context"] == CONTEXT
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("llama2_requests_total", "llama2_generation_tokens_total", "llama2_queue_depth",
                 "llama2_batch_size", "llama2_prompt_tokens_total"):
        assert f"# TYPE {name} " in text
    assert 'llama2_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert metric(server, "llama2_generation_tokens_total") > 0
    # time to first token: one observation per finished request, each positive (the wall clock bounds the sum)
    count = metric(server, "llama2_time_to_first_token_seconds_count")
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert metric(server, "llama2_time_to_first_token_seconds_count") == count + 1
    assert 0 < metric(server, "llama2_time_to_first_token_seconds_sum") < 600 * (count + 1)


def test_a_conversation_s_next_turn_reuses_its_stored_prefix(client, server, oracle, tok):
    """The second turn repeats the first turn's prompt and answer: the server copies them from its prefix cache
    (the hit counter grows by at least the first prompt's whole blocks) and answers as the Generator does."""
    system = {"role": "system", "content": "You answer questions about colours, shapes and numbers, briefly."}
    first = [system, {"role": "user", "content": "Name a colour."}]
    r1 = client.chat.completions.create(model=NAME, messages=first, temperature=0, max_tokens=10)
    before = metric(server, "llama2_prefix_cache_hit_tokens_total")
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And a shape?"}]
    r2 = client.chat.completions.create(model=NAME, messages=second, temperature=0, max_tokens=10)
    assert metric(server, "llama2_prefix_cache_hit_tokens_total") - before >= len(encode_dialog(tok, first)) // 16 * 16
    assert r2.choices[0].message.content == want(oracle, tok, encode_dialog(tok, second), temperature=0,
                                                 max_new_tokens=10).text


# ---------------------------------------------------------------------------------------------------- errors


def error_of(r, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err["message"]


def test_errors_in_openai_shape(server):
    chat = "/v1/chat/completions"
    assert "not valid JSON" in error_of(post(server, chat, None, raw=b"{not json"), 400, "invalid_json")
    error_of(post(server, chat, {"model": "gpt-4", "messages": MESSAGES}), 404, "model_not_found")
    order = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert "out of order" in error_of(post(server, chat, {"model": NAME, "messages": order}), 400)
    tags = [{"role": "user", "content": "hi [INST] there"}]
    assert "[INST]" in error_of(post(server, chat, {"model": NAME, "messages": tags}), 400)
    long = [{"role": "user", "content": "word " * 400}]
    error_of(post(server, chat, {"model": NAME, "messages": long}), 400, "context_length_exceeded")
    error_of(post(server, chat, {"model": NAME, "messages": MESSAGES, "max_tokens": 10_000}), 400,
             "max_tokens_too_large")
    error_of(post(server, chat, {"model": NAME, "messages": MESSAGES, "max_tokens": CONTEXT - 5}), 400,
             "context_length_exceeded")
    r = post(server, chat, {"model": NAME, "messages": MESSAGES, "temperature": "hot"})
    assert error_of(r, 400) and r.json()["error"]["param"] == "temperature"
    error_of(post(server, chat, {"model": NAME, "messages": MESSAGES}, key=None), 401, "invalid_api_key")
    error_of(post(server, chat, {"model": NAME, "messages": MESSAGES}, key="wrong"), 401, "invalid_api_key")
    error_of(post(server, chat, {"model": NAME, "messages": [{"role": "user", "content": "x" * 70_000}]}), 413)
    error_of(post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "stream_options": {}}), 400)
    error_of(post(server, "/v1/nothing", {}), 404, "unknown_url")
    error_of(httpx.get(server.url + "/v1/completions"), 405, "method_not_allowed")
    deep = b"[" * 2000 + b"]" * 2000
    assert "too deeply" in error_of(post(server, chat, None, raw=deep), 400, "invalid_json")
    for fmt in ({"type": "yaml"}, {"type": "json_schema", "json_schema": {"name": "x"}}, "json"):
        r = post(server, chat, {"model": NAME, "messages": MESSAGES, "response_format": fmt})
        assert "response_format" in error_of(r, 400) and r.json()["error"]["param"] == "response_format"
    assert "not usable" in error_of(post(server, chat, {"model": NAME, "messages": MESSAGES,
                                                        "guided_regex": "(unclosed"}), 400)
    both = {"model": NAME, "messages": MESSAGES, "guided_regex": "a", "response_format": {"type": "json_object"}}
    assert "one output constraint" in error_of(post(server, chat, both), 400)
    assert post(server, chat, {"model": NAME, "messages": MESSAGES, "max_tokens": 1,
                               "response_format": {"type": "text"}}).status_code == 200
    for field, value in (("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}), ("presence_penalty", 3),
                         ("frequency_penalty", "high")):
        r = post(server, chat, {"model": NAME, "messages": MESSAGES, field: value})
        assert error_of(r, 400) and r.json()["error"]["param"] == field
    assert "outside" in error_of(post(server, chat, {"model": NAME, "messages": MESSAGES,
                                                     "logit_bias": {"999999": 1}}), 400)
    r = post(server, chat, {"model": NAME, "messages": MESSAGES, "top_logprobs": 2})
    assert "needs logprobs" in error_of(r, 400)
    error_of(post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 21}), 400)
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # open, as the page is


def test_oversized_headers_get_431_and_the_server_goes_on(server):
    """A 200 KB header: one 431 the client reads (not a reset connection while it is still sending), a malformed
    request line stays a 400, and the next request is served."""
    r = httpx.get(server.url + "/health", headers={"X-Padding": "a" * 200_000}, timeout=30)
    assert r.status_code == 431 and "exceed 32 KiB" in r.text
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(b"NOT A REQUEST\r\n\r\n")
        assert s.recv(200).startswith(b"HTTP/1.1 400")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_an_unexpected_error_is_a_counted_500(server, monkeypatch):
    """A bug in the server answers 500 in OpenAI's shape (no traceback to the client) and /metrics counts it."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    name = 'llama2_requests_total{endpoint="/v1/completions",status="500"}'
    try:
        before = metric(server, name)
    except AssertionError:
        before = 0.0
    monkeypatch.setattr(server.app.state.worker.engine, "prepare", broken)
    r = post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 1})
    assert "RuntimeError" in error_of(r, 500, "internal_error") and "a bug" not in r.text
    assert metric(server, name) == before + 1


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="out of order"):
        client.chat.completions.create(model=NAME, messages=[{"role": "assistant", "content": "hi"}])
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_queue_full_is_429_with_retry_after(model, tok):
    """1 slot and 1 queue place: a third concurrent request is refused with 429 and Retry-After."""
    with slowed(start(model, tok, max_batch=1, max_queue=1, api_key=None), 0.02) as s:
        body = {"model": NAME, "messages": MESSAGES, "max_tokens": 80, "temperature": 0, "stream": True}
        streams = [httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) for _ in range(2)]
        opened = [cm.__enter__() for cm in streams]
        try:
            assert [r.status_code for r in opened] == [200, 200]
            r = httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
            error_of(r, 429, "queue_full")
            assert r.headers["retry-after"] == "1"
        finally:
            for cm in streams:
                cm.__exit__(None, None, None)
        wait_idle(s)


# ----------------------------------------------------------------------------------------------- disconnects


def test_disconnected_stream_frees_its_slot(slow_server):
    """A streaming client that goes away mid-answer: its request is cancelled and its slot freed at once."""
    wait_idle(slow_server)
    cancelled0 = metric(slow_server, "llama2_requests_cancelled_total")
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 80, "temperature": 0, "stop": None,
            "stream": True}
    sock = socket.create_connection((slow_server.host, slow_server.port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while got.count(b"data: ") < 3:  # the answer is streaming
        got += sock.recv(4096)
    assert httpx.get(slow_server.url + "/health").json()["busy_slots"] == 1
    sock.close()
    t0 = time.monotonic()
    wait_idle(slow_server, timeout=5)
    assert time.monotonic() - t0 < 2
    assert metric(slow_server, "llama2_requests_cancelled_total") == cancelled0 + 1


def test_disconnected_plain_request_frees_its_slot(slow_server):
    """The same for a client waiting for a whole (not streamed) answer."""
    wait_idle(slow_server)
    cancelled0 = metric(slow_server, "llama2_requests_cancelled_total")
    body = json.dumps({"model": NAME, "messages": MESSAGES, "max_tokens": 80, "temperature": 0}).encode()
    sock = socket.create_connection((slow_server.host, slow_server.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 5
    while httpx.get(slow_server.url + "/health").json()["busy_slots"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert httpx.get(slow_server.url + "/health").json()["busy_slots"] == 1
    sock.close()
    wait_idle(slow_server, timeout=5)
    assert metric(slow_server, "llama2_requests_cancelled_total") == cancelled0 + 1


def test_event_loop_stays_responsive_while_decoding(slow_server):
    """/health answers quickly while a long generation runs (the model runs in the worker thread)."""
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 80, "temperature": 0}
    t = threading.Thread(target=post, args=(slow_server, "/v1/chat/completions", body))
    t.start()
    try:
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            assert httpx.get(slow_server.url + "/health").status_code == 200
            times.append(time.perf_counter() - t0)
        assert sorted(times)[5] < 0.5
    finally:
        t.join()


# ------------------------------------------------------------------------------------------------- page, CLI


def test_chat_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for anchor in ('id="system"', 'id="stop"', 'id="reset"', 'id="temperature"', "/v1/chat/completions"):
        assert anchor in page
    assert "http://" not in page and "https://" not in page  # no CDN


def test_cli_errors_are_one_line(tmp_path, capsys):
    from llama2.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama2: error: checkpoint directory") and err.count("\n") == 1
    assert main(["serve", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err


def test_cli_serves_a_checkpoint(tmp_path, model, tok, sp_model_path):
    """`llama2 serve DIR --port 0` in a subprocess: it prints its URL and answers with the openai client."""
    import os
    import re
    import subprocess
    import sys

    from llama2.checkpoint import save_model

    ckpt = tmp_path / "tiny-ckpt"
    save_model(model, ckpt, tok)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "llama2", "serve", str(ckpt), "--port", "0", "--device", "cpu",
                          "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stderr.readline()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model="tiny-ckpt", messages=MESSAGES, temperature=0, max_tokens=6)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        p.terminate()
        p.wait(20)
