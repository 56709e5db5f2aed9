"""`megalm-prep train-tokenizer`: read a corpus with the same readers as `tokenize`, train a byte-level
BPE, save tokenizer.json atomically."""
from __future__ import annotations

import sys
import time
from typing import Iterator, Optional, TextIO

from data_prep.errors import PrepError
from data_prep.output_dir import prepare_output_dir
from data_prep.sources import (RecordReader, Skip, SkipCounter, check_parquet_columns, discover_inputs,
                               no_documents_error)
from data_prep.tokenizer import EOD_TOKEN, save_tokenizer, train_bpe


def train_tokenizer(inputs: list[str], vocab_size: int, output: str, *, json_key: str = "text",
                    glob: Optional[str] = None, input_format: str = "auto", special_tokens: Optional[list[str]] = None,
                    min_frequency: int = 2, strict: bool = False, allow_empty: bool = False, split_digits: bool = False,
                    out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> str:
    """Train and save; returns the sha256 of the written tokenizer.json. No documents at all is an
    error (nothing is written) unless `allow_empty` (--allow-empty)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    start = time.perf_counter()
    specials = list(special_tokens) if special_tokens else [EOD_TOKEN]
    if EOD_TOKEN not in specials:  # the end-of-document token is always there for --append-eod
        specials.append(EOD_TOKEN)
    if vocab_size < 256 + len(specials):
        raise PrepError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
                        f"256 byte tokens + {len(specials)} special tokens")
    files = discover_inputs(inputs, glob, input_format)
    check_parquet_columns(files, json_key)
    prepare_output_dir(output)
    reader = RecordReader(files, json_key)
    skips = SkipCounter(strict, 5, err)
    docs = 0

    def texts() -> Iterator[str]:
        nonlocal docs
        for item in reader.records():
            if isinstance(item, Skip):
                skips.add(item)
                continue
            docs += 1
            yield item

    tok = train_bpe(texts(), vocab_size, specials, min_frequency, split_digits)
    if docs == 0 and not allow_empty:
        raise no_documents_error(files, reader.count, skips, json_key)
    digest = save_tokenizer(tok, output)
    skipped = ", ".join(f"{k}={v}" for k, v in skips.counts.items() if v)
    print(f"{output}: byte-level BPE{' (digits split)' if split_digits else ''}, vocab {tok.get_vocab_size(with_added_tokens=True)} "
          f"(special tokens: {' '.join(specials)}), trained on {docs} documents / "
          f"{reader.bytes_read / 1e6:.1f} MB from {len(files)} file(s) in {time.perf_counter() - start:.1f} s"
          f"{f'; skipped {skipped}' if skipped else ''}; sha256 {digest[:16]}", file=out)
    return digest
