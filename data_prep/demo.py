"""`megalm-prep demo-corpus`: the README's corpus, built from the running interpreter's standard library.

Every machine with Python has it, so the main job needs no download. `__pycache__` and `site-packages`
are not walked (a source-built Python keeps site-packages inside its stdlib directory); the few stdlib
test files that are deliberately not UTF-8 are skipped and counted like any bad record.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from typing import Any, Optional, TextIO

from data_prep.inspection import inspect_output
from data_prep.pipeline import TokenizeOptions, tokenize
from data_prep.trainer import train_tokenizer


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def build_demo_corpus(output_dir: str, vocab_size: int = 8192, workers: int = 2, num_shards: Optional[int] = None,
                      progress: Optional[bool] = None, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> dict[str, Any]:
    """Train (or reuse) DIR/tokenizer.json on the stdlib's *.py files and tokenize them into DIR/stdlib."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    source = stdlib_dir()
    tokenizer = os.path.join(output_dir, "tokenizer.json")
    os.makedirs(output_dir, exist_ok=True)
    if os.path.isfile(tokenizer):
        print(f"{tokenizer}: exists, reusing it (delete it to retrain)", file=out)
    else:
        train_tokenizer([source], vocab_size, tokenizer, glob="*.py", input_format="text", out=out, err=err)
    prefix = os.path.join(output_dir, "stdlib")
    manifest = tokenize(TokenizeOptions(inputs=[source], tokenizer=tokenizer, output_prefix=prefix, glob="*.py",
                                        input_format="text", workers=workers, append_eod=True,
                                        num_shards=num_shards, progress=progress), out=out, err=err)
    inspect_output(prefix, tokenizer=tokenizer, max_chars=300, out=out, err=err)
    return manifest
