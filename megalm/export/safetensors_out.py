"""Writing a set of safetensors files one tensor at a time, with Hugging Face's sharding and index.

Why not `safetensors.torch.save_file`: it takes a dict of every tensor of the file, so an export would
hold a whole shard (by default up to 5 GB, or the whole model when it fits) in memory. The format lets
us do without: a file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range in the data that follows, then the data. Every shape and dtype of an
export is known before any tensor is read (the model config says them), so the header is written
first and each tensor's bytes are appended as it is produced, then dropped. The files are ordinary
safetensors: `safetensors.safe_open` and `transformers` read them, and the test compares them with
`save_file`'s output tensor for tensor.

Sharding follows HF's rule (`save_pretrained`): tensors in order, a new shard when the next would pass
`max_shard_bytes` (a tensor larger than the limit gets a shard of its own), names
model-0000k-of-0000n.safetensors and model.safetensors.index.json; a single file is model.safetensors.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
HEADER_ALIGN = 8  # safetensors pads the header with spaces so the data starts 8-byte aligned


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an export, before it is read: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.tensor([], dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """HF's sharding: in order, a new shard whenever the next tensor would take this one past the limit."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(count: int, single: str = SINGLE_FILE) -> list[str]:
    return [single] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


def _write_tensor(f: BinaryIO, spec: TensorSpec, name: str, tensor: torch.Tensor) -> None:
    if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise ValueError(f"safetensors stream: got {name} {tuple(tensor.shape)} {tensor.dtype}, but the header "
                         f"announced {spec.name} {spec.shape} {spec.dtype} at this place")
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # raw little-endian bytes, no copy
    f.write(memoryview(data.numpy()))


def write_safetensors_stream(out_dir: str, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                             max_shard_bytes: int, single_file: str = SINGLE_FILE) -> list[str]:
    """Write `tensors` ((name, tensor) in the order of `specs`, each matching its spec) into `out_dir` as
    one `single_file`, or shards + index when they pass `max_shard_bytes`. Each tensor is written
    and released before the next is drawn from the iterator. Returns the file names written."""
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards), single_file)
    stream: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    for fname, shard in zip(names, shards):
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(_header(shard, {"format": "pt"}))
            for spec in shard:
                try:
                    name, tensor = next(stream)
                except StopIteration:
                    raise ValueError(f"safetensors stream: ended before {spec.name}") from None
                _write_tensor(f, spec, name, tensor)
                del tensor
    if next(stream, None) is not None:
        raise ValueError("safetensors stream: more tensors than the header announced")
    if len(shards) == 1:
        return names
    weight_map = {spec.name: fname for fname, shard in zip(names, shards) for spec in shard}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}, f, indent=2)
    return names + [INDEX_FILE]
