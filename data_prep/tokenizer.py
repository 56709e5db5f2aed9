"""Tokenizers: train a byte-level BPE, load any tokenizer.json, and identify it by the hash of its file.

The sha256 of tokenizer.json goes into shard manifests (and later checkpoints), so a run can tell that
its shards and its tokenizer belong together.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data_prep.errors import PrepError

EOD_TOKEN = "<|endoftext|>"


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@dataclass
class LoadedTokenizer:
    tokenizer: Tokenizer
    path: str
    sha256: str
    vocab_size: int  # including added/special tokens: every id the tokenizer can emit is below this

    def token_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)


def load_tokenizer(path: str) -> LoadedTokenizer:
    """Load a tokenizer.json; any failure is a PrepError that names the file (fail before any work)."""
    if not os.path.isfile(path):
        raise PrepError(f"tokenizer file {path!r} does not exist")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        raise PrepError(f"tokenizer file {path!r} does not load as a Hugging Face tokenizer.json: {exc}") from None
    return LoadedTokenizer(tok, path, file_sha256(path), tok.get_vocab_size(with_added_tokens=True))


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2,
              split_digits: bool = False) -> Tokenizer:
    """A GPT-2-style byte-level BPE: every byte is in the initial alphabet, so any UTF-8 text encodes
    without unknown tokens, and decode(encode(text)) == text. `split_digits` isolates every digit before
    the byte-level split (Llama's choice), so no merge ever spans two digits; such a tokenizer takes
    the tokenizers library's path in data_prep (fast_bpe supports the plain GPT-2 set-up only)."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str) -> str:
    """Write atomically (temp name, then rename) and return the file's sha256."""
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
    return file_sha256(path)
