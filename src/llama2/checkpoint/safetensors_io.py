"""A small, memory-frugal reader and a streaming writer for the safetensors format.

Format: 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}, optional
"__metadata__"}), then the raw little-endian tensor bytes. The reader reads one tensor at a time with plain
file reads straight into a fresh tensor (no memory map: mapped pages would count towards resident memory until
the file is closed), so a load never holds more than the final weights plus one tensor. The writer streams
one tensor at a time, converting dtype on the way, so a save never builds a second copy of a shard.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import Llama2Error

DTYPE_NAMES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAME_OF_DTYPE = {v: k for k, v in DTYPE_NAMES.items()}
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; every problem is a Llama2Error naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise Llama2Error(f"{path}: not a safetensors file or truncated (file has {size} bytes, header "
                                  f"claims {max(n, 0)}); re-download or re-create it")
            raw = f.read(n)
    except FileNotFoundError:
        raise Llama2Error(f"{path}: file not found; the checkpoint is incomplete") from None
    except OSError as e:
        raise Llama2Error(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise Llama2Error(f"{path}: corrupt safetensors header ({e}); re-download or re-create the file") from None
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPE_NAMES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise Llama2Error(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            raise Llama2Error(f"{path}: corrupt safetensors header: tensor {name!r} has shape {list(shape)} but "
                              f"byte range [{begin}, {end})")
        if data_start + end > size:
            raise Llama2Error(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file "
                              f"has {size} bytes; re-download or re-create it")
        out[name] = TensorInfo(path, name, dtype, shape, data_start + begin, nbytes)
    return out


def read_tensor(f: BinaryIO, info: TensorInfo, staging: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor from an open file (opened with buffering=0) into a fresh CPU tensor of its stored dtype,
    or, given `staging` (a flat uint8 CPU buffer of at least info.nbytes), into the front of that buffer."""
    if staging is None or info.nbytes == 0:
        t = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes == 0:
            return t
        raw = t.reshape(-1).view(torch.uint8)
    else:
        raw = staging[:info.nbytes]
        t = raw.view(info.dtype).view(info.shape)
    buf = memoryview(raw.numpy())
    f.seek(info.start)
    done = 0
    while done < info.nbytes:
        got = f.readinto(buf[done:])
        if not got:
            raise Llama2Error(f"{info.path}: truncated while reading tensor {info.name!r}; re-download it")
        done += got
    return t


def tensor_nbytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return t.numel() * (dtype or t.dtype).itemsize


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None, on_tensor=None,
                      fetch: Callable[[str], torch.Tensor] | None = None) -> int:
    """Stream tensors into `path` (converted to dtype if given), fsync it, and return the bytes of tensor data.

    `tensors` is iterated twice (header, then data), so pass a list; each tensor is converted and copied to the
    CPU only while it is written. `on_tensor(nbytes)` is called after each one (progress bars). With `fetch`,
    the listed tensors only give names, shapes and dtypes (they may be on the meta device) and each one's data
    is `fetch(name)`, called in list order just before it is written (gathering a sharded model tensor by tensor).
    """
    items = list(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, t in items:
        out_dtype = dtype or t.dtype
        if out_dtype not in NAME_OF_DTYPE:
            raise Llama2Error(f"cannot write tensor {name!r}: dtype {out_dtype} has no safetensors name")
        n = tensor_nbytes(t, out_dtype)
        header[name] = {"dtype": NAME_OF_DTYPE[out_dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in items:
            src = fetch(name) if fetch is not None else t
            if src.shape != t.shape:
                raise Llama2Error(f"tensor {name!r}: fetched shape {tuple(src.shape)}, expected {tuple(t.shape)}")
            data = src.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
            if data.numel():
                f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            if on_tensor is not None:
                on_tensor(data.numel() * data.element_size())
            del data
        f.flush()
        os.fsync(f.fileno())
    return offset
