"""GGUF export and import (llama2.checkpoint.gguf, `llama2 convert ... --to gguf|hf`), with llama.cpp
(llama-cpp-python) as the oracle: it loads our files, its logits match ours in f32, its greedy tokens equal ours
in f16, its q8_0 argmax agrees with ours; the reverse path gives back the weights and transformers loads them.

The models are tiny (dim 64, 2 layers, the 1000-piece test tokenizer) and trained for a few seconds on real text,
so that their next-token distributions have the clear maxima of a real model (an untrained model's near-ties
would make argmax comparisons a coin toss at some positions)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import corpus_text
from llama2.tokenizer import LLAMA2_CHAT_TEMPLATE
from llama2.checkpoint import load_model, save_model
from llama2.checkpoint.common import to_interleaved
from llama2.checkpoint.gguf import (from_interleaved, gguf_name, gguf_tokenizer, load_gguf, our_name,
                                    parse_gguf_dtype, save_gguf)
from llama2.cli import main as cli_main
from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.inference.cpu_kernels import dequantize_blocks, quantize_blocks
from llama2.inference.quantize import quantize_int8
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
gguf = pytest.importorskip("gguf")

SHAPES = {"mha": 4, "gqa": 2, "mqa": 1}  # n_kv_heads of 4 query heads
DTYPES = ("f32", "f16", "bf16", "q8_0")
GGML_F32 = 0  # GGML_TYPE_F32, for llama.cpp's KV cache (its default, f16, rounds keys and values)


def train_tiny(tok: Tokenizer, n_kv_heads: int, steps: int = 150, seed: int = 0) -> Transformer:
    """A dim-64 model trained for `steps` AdamW steps on real text (a few seconds on one core)."""
    ids = torch.tensor(tok.encode(corpus_text(200_000)))
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=tok.vocab_size,
                      hidden_dim=160, max_seq_len=256)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T, B = 64, 16
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (B,)).tolist()
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models(tok) -> dict[str, Transformer]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: train_tiny(tok, kv) for name, kv in SHAPES.items()}
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(models, tok, tmp_path_factory):
    """(shape, dtype) -> its GGUF file, exported once."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(shape: str, dtype: str) -> Path:
        if (shape, dtype) not in cache:
            cache[shape, dtype] = save_gguf(models[shape], root / f"{shape}-{dtype}.gguf", tok, dtype)
        return cache[shape, dtype]

    return get


@pytest.fixture(scope="module")
def held_out(tok) -> list[int]:
    """128 tokens of text the models were not trained on (the corpus' last part)."""
    return tok.encode(corpus_text(400_000)[-20_000:])[:128]


@contextlib.contextmanager
def llama_cpp_model(path: Path, n_ctx: int = 256):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1,
                          n_threads_batch=1, type_k=GGML_F32, type_v=GGML_F32, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    with llama_cpp_model(path) as llm:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])


def our_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def relative_max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


# ---------------------------------------------------------------------------------------------------------------
# What the file holds


def test_names_and_rotary_permutation_round_trip():
    for ours in ("embed_tokens.weight", "norm.weight", "lm_head.weight", "layers.7.self_attn.k_proj.weight",
                 "layers.0.mlp.down_proj.weight", "layers.12.post_attention_layernorm.weight"):
        assert our_name(gguf_name(ours)) == ours
    assert gguf_name("layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight"
    assert our_name("blk.0.attn_q.bias") is None and our_name("rope_freqs.weight") is None
    w = torch.randn(4 * 16, 8)
    assert torch.equal(from_interleaved(to_interleaved(w, 4), 4), w)
    assert [parse_gguf_dtype(s) for s in ("fp32", "F16", "bfloat16", "q8_0", None)] == \
        ["f32", "f16", "bf16", "q8_0", None]
    with pytest.raises(Llama2Error, match="unknown GGUF type"):
        parse_gguf_dtype("q4_k")


@pytest.mark.parametrize("dtype", DTYPES)
def test_metadata_tokenizer_and_tensor_types(files, models, tok, dtype):
    path = files("gqa", dtype)
    f = fields(path)
    cfg = models["gqa"].config
    assert f["general.architecture"] == "llama" and f["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32,
                                                                               "q8_0": 7}[dtype]
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.rope.dimension_count"], f["llama.vocab_size"]) == \
        (cfg.max_seq_len, cfg.dim, cfg.n_layers, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
         cfg.vocab_size)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.tokens"] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert f["tokenizer.ggml.scores"] == pytest.approx([tok.sp.GetScore(i) for i in range(tok.vocab_size)])
    types = f["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256 and set(types[259:]) == {1}
    assert (f["tokenizer.ggml.unknown_token_id"], f["tokenizer.ggml.bos_token_id"],
            f["tokenizer.ggml.eos_token_id"]) == (0, 1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.add_space_prefix"] is True
    assert f["tokenizer.chat_template"] == LLAMA2_CHAT_TEMPLATE
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert len(tensors) == 3 + 9 * cfg.n_layers
    for name, t in tensors.items():
        want = "F32" if len(t.shape) == 1 else dtype.upper()
        assert t.tensor_type.name == want, name


def test_f32_tensors_are_exact_with_q_k_in_metas_order(files, models):
    model = models["gqa"]
    tensors = {t.name: t for t in gguf.GGUFReader(files("gqa", "f32")).tensors}
    for ours, p in model.state_dict().items():
        t = tensors[gguf_name(ours)]
        want = p
        if ours.endswith("q_proj.weight"):
            want = to_interleaved(p, model.config.n_heads)
        elif ours.endswith("k_proj.weight"):
            want = to_interleaved(p, model.config.n_kv_heads)
        assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(want.shape), want), ours


def test_q8_0_and_bf16_bytes_decode_with_the_gguf_package(files, models):
    """The gguf package's own dequantisation (an independent reader of the block layout) gives back our int8
    weights exactly (the ones `--quantize int8` runs with), and the bf16 rounding of ours."""
    model = models["mha"]
    q8 = {t.name: t for t in gguf.GGUFReader(files("mha", "q8_0")).tensors}
    bf = {t.name: t for t in gguf.GGUFReader(files("mha", "bf16")).tensors}
    for ours in ("layers.0.mlp.down_proj.weight", "layers.1.self_attn.o_proj.weight", "lm_head.weight",
                 "embed_tokens.weight"):
        w = model.state_dict()[ours]
        got = gguf.quants.dequantize(q8[gguf_name(ours)].data, gguf.GGMLQuantizationType.Q8_0)
        assert torch.equal(torch.from_numpy(got), dequantize_blocks(*quantize_blocks(w)))
        got = gguf.quants.dequantize(bf[gguf_name(ours)].data, gguf.GGMLQuantizationType.BF16)
        assert torch.equal(torch.from_numpy(got), w.bfloat16().float())


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp as the oracle


@pytest.mark.parametrize("shape", SHAPES)
def test_llama_cpp_f32_logits_match_ours(files, models, held_out, shape):
    theirs = cpp_logits(files(shape, "f32"), held_out)
    assert relative_max_diff(theirs, our_logits(models[shape], held_out)) <= 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_llama_cpp_f16_greedy_tokens_equal_ours(files, models, held_out, shape):
    model, prompt, steps = models[shape], held_out[:8], 32
    ours = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ours.append(int(model(torch.tensor([ours]))[0, -1].argmax()))
    with llama_cpp_model(files(shape, "f16")) as llm:
        theirs = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
            theirs.append(t)
            if len(theirs) == steps:
                break
    assert theirs == ours[len(prompt):]


@pytest.mark.parametrize("shape", SHAPES)
def test_llama_cpp_q8_0_teacher_forced_argmax_agrees_with_ours(files, models, held_out, shape):
    theirs = cpp_logits(files(shape, "q8_0"), held_out).argmax(-1)
    int8 = our_logits(quantize_int8(models[shape]), held_out).argmax(-1)
    fp32 = our_logits(models[shape], held_out).argmax(-1)
    assert (theirs == int8).mean() >= 0.9 and (theirs == fp32).mean() >= 0.9


def test_llama_cpp_bf16_logits_are_close(files, models, held_out):
    theirs = cpp_logits(files("mqa", "bf16"), held_out)
    assert relative_max_diff(theirs, our_logits(models["mqa"], held_out)) <= 3e-2


def test_odd_shape_padded_vocab_rope_base_and_q8_0_fallback(tok, tmp_path, held_out):
    """A random model with rotary base 5e5, eps 1e-6, 1024 embedding rows for the 1000 pieces (padded with unused
    pieces), and a feed-forward size (80) that is not whole q8_0 blocks (ffn_down falls back to F16)."""
    torch.manual_seed(3)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=1024, hidden_dim=80,
                      norm_eps=1e-6, rope_theta=5e5, max_seq_len=256)
    model = Transformer(cfg).eval()
    model.init_weights(0.1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)  # norms other than ones: their placement shows
    path = save_gguf(model, tmp_path / "odd.gguf", tok, "f32")
    f = fields(path)
    assert len(f["tokenizer.ggml.tokens"]) == 1024 and f["tokenizer.ggml.tokens"][1000] == "[PAD1000]"
    assert f["tokenizer.ggml.token_type"][1000:] == [5] * 24
    assert relative_max_diff(cpp_logits(path, held_out), our_logits(model, held_out)) <= 1e-3
    q8 = save_gguf(model, tmp_path / "odd-q8.gguf", tok, "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q8).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    assert (cpp_logits(q8, held_out).argmax(-1) == our_logits(model, held_out).argmax(-1)).mean() >= 0.8
    back = load_gguf(path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    assert back.config.rope_theta == 5e5 and back.config.norm_eps == pytest.approx(1e-6)
    assert gguf_tokenizer(path).vocab_size == 1024


def test_llama_cpp_reads_the_chat_template(files):
    """llama-cpp-python's chat completion renders the template stored in the file: Meta's Llama 2 format."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Who?"}]
    with llama_cpp_model(files("mha", "f16")) as llm:
        template = llm.metadata["tokenizer.chat_template"]
        assert llm.chat_format == "chat_template.default" and llm._model.n_ctx_train() == 256
    prompt = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")(messages=messages).prompt
    assert prompt == "<s>[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Who? [/INST]"


# ---------------------------------------------------------------------------------------------------------------
# The command and the reverse path


@pytest.fixture(scope="module")
def hf_src(models, tok, tmp_path_factory) -> Path:
    return save_model(models["gqa"], tmp_path_factory.mktemp("src") / "tiny-hf", tok)


@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_to_gguf_and_back_to_hf(hf_src, models, tok, tmp_path, held_out, capsys, dtype):
    out = tmp_path / f"m-{dtype}.gguf"
    assert cli_main(["convert", str(hf_src), str(out), "--to", "gguf", "--dtype", dtype, "--quiet"]) == 0
    assert "converted" in capsys.readouterr().out and [p.name for p in tmp_path.iterdir()] == [out.name]
    assert cli_main(["convert", str(out), str(tmp_path / "hf"), "--to", "hf", "--quiet"]) == 0
    back = load_model(tmp_path / "hf")
    assert back.lm_head.weight.dtype == {"f16": torch.float16, "bf16": torch.bfloat16}.get(dtype, torch.float32)
    for name, w in models["gqa"].state_dict().items():
        got = back.state_dict()[name]
        # f32: exact; f16 / bf16: the rounding of each weight (the HF checkpoint has one dtype, norms too);
        # q8_0: exactly our int8 weights, dequantised (norms are stored in f32)
        want = dequantize_blocks(*quantize_blocks(w)) if dtype == "q8_0" and w.ndim == 2 else w.to(got.dtype)
        assert torch.equal(got, want), name
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([held_out])).logits[0].numpy()
    assert relative_max_diff(theirs, our_logits(back.float(), held_out)) <= 1e-4
    again = Tokenizer(tmp_path / "hf")
    text = corpus_text(5000)[-2000:]
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == LLAMA2_CHAT_TEMPLATE


def test_gguf_to_gguf_retypes_and_meta_source(hf_src, files, tmp_path, tok):
    assert cli_main(["convert", str(files("gqa", "f32")), str(tmp_path / "q.gguf"), "--to", "gguf", "--dtype",
                     "q8_0", "--quiet"]) == 0
    direct = {t.name: np.array(t.data) for t in gguf.GGUFReader(files("gqa", "q8_0")).tensors}
    for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors:
        assert np.array_equal(np.array(t.data), direct[t.name]), t.name
    assert cli_main(["convert", str(hf_src), str(tmp_path / "meta"), "--to", "meta", "--quiet"]) == 0
    assert cli_main(["convert", str(tmp_path / "meta"), str(tmp_path / "m.gguf"), "--to", "gguf", "--quiet",
                     "--tokenizer", str(hf_src)]) == 0
    a = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert all(np.array_equal(a[k], np.array(t.data)) for k, t in
               ((t.name, t) for t in gguf.GGUFReader(files("gqa", "f32")).tensors))


def _write_gguf(path: Path, arch: str = "llama", tensor_type: str = "F32") -> Path:
    """A small hand-made GGUF: one 32x64 token_embd tensor of the given type and a llama header."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in (("embedding_length", 64), ("block_count", 1), ("feed_forward_length", 64),
                       ("attention.head_count", 4), ("vocab_size", 32)):
        w.add_uint32(f"{arch}.{key}", value)
    data = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    w.add_tensor("token_embd.weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _one_error(capsys, argv: list[str], match: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama2: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def test_bad_inputs_are_one_clear_error(tmp_path, hf_src, files, models, capsys):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    _one_error(capsys, ["convert", str(tmp_path / "junk.gguf"), str(tmp_path / "o"), "--to", "hf"], "not a GGUF")
    (tmp_path / "cut.gguf").write_bytes(files("mha", "f32").read_bytes()[:5000])
    _one_error(capsys, ["convert", str(tmp_path / "cut.gguf"), str(tmp_path / "o"), "--to", "hf"], "truncated")
    _one_error(capsys, ["convert", str(_write_gguf(tmp_path / "gpt2.gguf", "gpt2")), str(tmp_path / "o"), "--to",
                        "hf"], "architecture 'gpt2' is not supported")
    _one_error(capsys, ["convert", str(_write_gguf(tmp_path / "q4.gguf", tensor_type="Q4_0")), str(tmp_path / "o"),
                        "--to", "hf"], "has type Q4_0")
    bare = save_model(models["mha"], tmp_path / "bare")  # no tokenizer.model
    _one_error(capsys, ["convert", str(bare), str(tmp_path / "b.gguf"), "--to", "gguf"], "--tokenizer")
    _one_error(capsys, ["convert", str(hf_src), str(tmp_path / "b.gguf"), "--to", "gguf", "--dtype", "q4_k"],
               "unknown GGUF type")
    _one_error(capsys, ["convert", str(hf_src), str(tmp_path / "b.bin"), "--to", "gguf"], ".gguf")
    _one_error(capsys, ["convert", str(hf_src), str(tmp_path), "--to", "gguf"], "is a directory")
    (tmp_path / "taken.gguf").write_bytes(b"x")
    _one_error(capsys, ["convert", str(hf_src), str(tmp_path / "taken.gguf"), "--to", "gguf"], "--force")
    _one_error(capsys, ["convert", str(hf_src), str(tmp_path / "h"), "--to", "hf", "--dtype", "q8_0"],
               "is a GGUF type")
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_is_atomic(models, tok, tmp_path, monkeypatch):
    import llama2.checkpoint.gguf as mod

    target = save_gguf(models["mha"], tmp_path / "m.gguf", tok, "f16")
    before = target.read_bytes()
    calls = []

    def failing(t, kind):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(t, kind)

    real = mod.encode_tensor
    monkeypatch.setattr(mod, "encode_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        save_gguf(models["mha"], target, tok, "q8_0")
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    with pytest.raises(Llama2Error, match="pieces"):
        save_gguf(Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=100, hidden_dim=32)),
                  tmp_path / "small.gguf", tok)
