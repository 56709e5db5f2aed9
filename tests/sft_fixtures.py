"""Fine-tuning records, their prep output, and the tokens + loss mask a record must become, computed here
independently of data_prep (the tokenizers library on each piece, the template spelled out literally)."""
from __future__ import annotations

import io
import os
import random
from typing import Any

from tests.prep_fixtures import WORDS, write_jsonl

SEQ_LEN = 32  # the tiny run's data.seq_len
EOD_TOKEN = "<|endoftext|>"
# The documented template (data_prep/sft.py, README), literally: a change to it must change this too.
HEADER = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}
TURN_END = "\n\n"


def copy_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Learnable records of both kinds: the response repeats the prompt's words (every fifth record a
    chat with a user and an assistant turn), short enough for SEQ_LEN with the tiny tokenizer."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS[:16]) for _ in range(rng.randint(2, 5)))
        if i % 5 == 4:
            records.append({"messages": [{"role": "user", "content": words},
                                         {"role": "assistant", "content": words}]})
        else:
            records.append({"prompt": f"repeat: {words}\n", "response": words})
    return records


def expected_tokens_and_mask(tokenizer_path: str, record: dict[str, Any],
                             seq_len: int = SEQ_LEN) -> tuple[list[int], list[int]]:
    """The padded document (tokens, mask) one record must give: each piece tokenised on its own."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    eod = tok.token_to_id(EOD_TOKEN)
    pieces: list[tuple[list[int], int]] = []
    if "messages" in record:
        for turn in record["messages"]:
            trained = int(turn["role"] == "assistant")
            pieces += [(tok.encode(HEADER[turn["role"]]).ids, 0), (tok.encode(turn["content"]).ids, trained),
                       ([eod], 1) if trained else (tok.encode(TURN_END).ids, 0)]
    else:
        pieces = [(tok.encode(record["prompt"]).ids, 0), (tok.encode(record["response"]).ids, 1), ([eod], 1)]
    ids = [i for part, _ in pieces for i in part][:seq_len]
    mask = [flag for part, flag in pieces for _ in part][:seq_len]
    return ids + [eod] * (seq_len - len(ids)), mask + [0] * (seq_len - len(mask))


def prep_sft(records: list[Any], tokenizer_path: str, prefix: str, seq_len: int = SEQ_LEN,
             **options: Any) -> tuple[dict[str, Any], str]:
    """Write `records` as JSONL beside `prefix` and run `tokenize --sft` on them: (manifest, stderr)."""
    from data_prep.pipeline import TokenizeOptions, tokenize

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    source = write_jsonl(prefix + ".input.jsonl", records)
    err = io.StringIO()
    manifest = tokenize(TokenizeOptions(inputs=[source], tokenizer=tokenizer_path, output_prefix=prefix, sft=True,
                                        seq_len=seq_len, progress=False, **options), out=io.StringIO(), err=err)
    return manifest, err.getvalue()

