"""Shared helpers: dtype names (llama2.dtypes), the sampling flags of generate/chat (commands/_options), make_dir."""

from __future__ import annotations

import argparse

import pytest
import torch

from llama2 import Llama2Error
from llama2.atomic import make_dir
from llama2.cli import build_parser
from llama2.commands._options import add_sampling_args, sampling_params
from llama2.device import resolve_dtype
from llama2.dtypes import dtype_name, hf_dtype_name, parse_dtype


def test_dtype_names():
    for name, dt in [("fp32", torch.float32), ("BF16", torch.bfloat16), ("torch.float16", torch.float16),
                     ("half", torch.float16), ("bfloat16", torch.bfloat16), (torch.float64, torch.float64)]:
        assert parse_dtype(name) is dt
    assert parse_dtype(None) is None and parse_dtype("auto") is None
    with pytest.raises(Llama2Error, match="unknown dtype 'fp8'; choose fp32, bf16 or fp16"):
        parse_dtype("fp8")
    assert hf_dtype_name(torch.bfloat16) == "bfloat16" and hf_dtype_name(torch.int8) == "float32"
    assert dtype_name(torch.float16) == "float16"
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32 and resolve_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(Llama2Error, match="unknown dtype 'int4'"):
        resolve_dtype("int4", cpu)


def _parse(argv: list[str], **defaults) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_sampling_args(p, **defaults)
    return p.parse_args(argv)


def test_sampling_args_roundtrip():
    params = sampling_params(_parse([]))
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens, params.seed, params.stop) == (
        0.6, 0.9, 0, 256, None, [])
    args = _parse(["--temperature", "0", "--top-p", "0.5", "--top-k", "40", "--max-new-tokens", "7", "--seed", "3",
                   "--stop", "\n\n", "--stop", "END"], max_new_tokens=512)
    params = sampling_params(args, truncate=True)
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens, params.seed) == (0, 0.5, 40, 7, 3)
    assert params.stop == ["\n\n", "END"] and params.truncate
    assert _parse([], max_new_tokens=512).max_new_tokens == 512


@pytest.mark.parametrize("argv, flag", [
    (["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--top-k", "-2"], "--top-k"),
    (["--max-new-tokens", "-1"], "--max-new-tokens")])
def test_sampling_errors_name_the_flag(argv, flag):
    with pytest.raises(Llama2Error, match=f"^{flag} "):
        sampling_params(_parse(argv))


def test_generate_and_chat_share_the_sampling_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "_options" not in sub.choices
    for verb in ("generate", "chat"):
        flags = {s for a in sub.choices[verb]._actions for s in a.option_strings}
        assert {"--temperature", "--top-p", "--top-k", "--max-new-tokens", "--seed", "--stop"} <= flags, verb
    assert parser.parse_args(["chat", "ckpt"]).max_new_tokens == 512
    assert parser.parse_args(["generate", "ckpt", "--prompt", "x"]).max_new_tokens == 256


def test_make_dir(tmp_path):
    assert make_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert make_dir(tmp_path / "a") == tmp_path / "a"  # existing is fine
    (tmp_path / "f").write_text("x")
    with pytest.raises(Llama2Error, match=f"cannot create --output directory {tmp_path / 'f'}: a file"):
        make_dir(tmp_path / "f", "--output directory")
    with pytest.raises(Llama2Error, match="cannot create output directory .*f/sub"):
        make_dir(tmp_path / "f" / "sub")
