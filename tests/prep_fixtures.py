"""Small deterministic corpora, a tiny tokenizer and shard readers shared by the tests/test_prep_* files."""
from __future__ import annotations

import gzip
import json
import os
import random
import struct
import sys
from typing import Any, Optional

import numpy as np

WORDS = ("the model reads tokens from shards and learns to predict the next one while data moves "
         "through many workers def return class import numpy value é ü ß 中文 数据 🙂 λx").split()


def make_texts(n: int = 60, seed: int = 0) -> list[str]:
    """Documents of varied length (a few words to a few hundred), with some non-ASCII text and newlines."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 300))]
        lines = [" ".join(words[j:j + 12]) for j in range(0, len(words), 12)]
        texts.append(f"doc {i}: " + "\n".join(lines))
    return texts


def train_tiny_tokenizer(path: str, vocab_size: int = 400) -> str:
    from data_prep.tokenizer import EOD_TOKEN, save_tokenizer, train_bpe

    save_tokenizer(train_bpe(make_texts(120, seed=7), vocab_size, [EOD_TOKEN]), path)
    return path


def write_jsonl(path: str, records: list[Any], compress: Optional[str] = None) -> str:
    """Each record is a dict (dumped as JSON) or a raw str/bytes line written as is."""
    lines = []
    for r in records:
        if isinstance(r, bytes):
            lines.append(r)
        elif isinstance(r, str):
            lines.append(r.encode())
        else:
            lines.append(json.dumps(r, ensure_ascii=False).encode())
    data = b"\n".join(lines) + b"\n"
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def expected_ids(tokenizer_path: str, texts: list[str], eod: bool = True) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    eod_id = tok.token_to_id("<|endoftext|>")
    return [tok.encode(t).ids + ([eod_id] if eod else []) for t in texts]


def parse_idx(path: str) -> dict[str, Any]:
    """An independent MMIDIDX v1 parser (struct only) for checking the on-disk layout byte by byte."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00", raw[:9]
    (version,) = struct.unpack("<Q", raw[9:17])
    (code,) = struct.unpack("<B", raw[17:18])
    seqs, docs = struct.unpack("<QQ", raw[18:34])
    off = 34
    lengths = list(struct.unpack(f"<{seqs}i", raw[off:off + 4 * seqs]))
    off += 4 * seqs
    pointers = list(struct.unpack(f"<{seqs}q", raw[off:off + 8 * seqs]))
    off += 8 * seqs
    doc_idx = list(struct.unpack(f"<{docs}q", raw[off:off + 8 * docs]))
    off += 8 * docs
    assert off == len(raw), f"{path}: {len(raw) - off} trailing bytes"
    return {"version": version, "code": code, "lengths": lengths, "pointers": pointers, "doc_idx": doc_idx}


def read_docs(prefixes: list[str]) -> list[list[int]]:
    """All documents of the given shards, in order, decoded with the independent parser."""
    dtypes = {8: "<u2", 4: "<i4", 1: "u1"}  # uint8: loss masks of fine-tuning outputs
    out = []
    for prefix in prefixes:
        idx = parse_idx(prefix + ".idx")
        data = np.fromfile(prefix + ".bin", dtype=dtypes[idx["code"]])
        size = np.dtype(dtypes[idx["code"]]).itemsize
        for length, ptr in zip(idx["lengths"], idx["pointers"]):
            out.append(data[ptr // size: ptr // size + length].tolist())
    return out


def file_bytes(prefixes: list[str]) -> list[bytes]:
    res = []
    for p in prefixes:
        for ext in (".bin", ".idx"):
            with open(p + ext, "rb") as f:
                res.append(f.read())
    return res


def prep_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "data_prep", *args]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
