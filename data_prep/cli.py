"""`megalm-prep`: the command line of data_prep (argument parsing and dispatch only).

Exit status: 0 success, 2 usage or input error (message names the file / option), 1 anything else;
interrupted: 130 (SIGINT, Ctrl-C) or 143 (SIGTERM), i.e. 128 + the signal, as a shell reports it, after
the workers are ended and the temporary files removed (the output resumes on a re-run).
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading
from typing import Optional

from data_prep.errors import Interrupted, PrepError

TOKENIZE_EPILOG = """\
output naming:
  one shard (the default, or --num-shards 1): PREFIX.bin + PREFIX.idx, directly usable as a data path;
  several shards: PREFIX_00000.bin/.idx, PREFIX_00001.bin/.idx, ... in document order.
  Always PREFIX.manifest.json: inputs (size, sha256), tokenizer sha256, dtype, documents, tokens,
  skipped records by reason, elapsed seconds and the list of shards.
resume:
  shards appear only when complete (written as *.tmp, then renamed). Re-running the same command keeps
  the complete shards recorded in the manifest and continues after them; an output that is already
  complete is left as it is.
bad records:
  malformed JSON, missing field, non-UTF-8 bytes and empty documents are skipped and counted (the first
  few named with file:line on stderr); --strict stops at the first one with exit status 2.
  No document at all is an error (exit 2) unless --allow-empty.
damaged inputs:
  a .gz/.zst input that is truncated, corrupt or not in that format stops the run (exit 2, naming the
  file); the manifest keeps "complete": false and the error. A re-run after fixing the input starts over.
fine-tuning data (--sft --seq-len N):
  JSONL records {"prompt": ..., "response": ...} or {"messages": [{"role": "system|user|assistant",
  "content": ...}, ...]}, told apart per record. Each record becomes one document of exactly N tokens
  (cut after N, padded with the EOD id) plus PREFIX.loss_mask.bin/.idx (uint8, 1 = trained: the response
  or assistant turns and their EOD). Skipped and counted besides the above: unknown_role,
  no_assistant_turn, prompt_too_long (nothing of the response fits in N). Train with data.seq_len=N.
interrupts:
  SIGINT (Ctrl-C, or to the main process alone) and SIGTERM end the workers and exit 130 / 143, leaving
  only complete shards; re-run the same command to continue.
"""


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, quoted globs ('data/*.jsonl.gz') or directories (text trees: one document per "
                        "file; __pycache__, site-packages and hidden directories are not walked)")
    p.add_argument("--json-keys", "--column", dest="json_keys", nargs="+", default=None, metavar="KEY",
                   help="JSONL field / Parquet column holding the text (default: text)")
    p.add_argument("--glob", default=None, metavar="PATTERN",
                   help="only files under input directories whose name (or relative path, if the pattern "
                        "has a '/') matches, e.g. '*.py'")
    p.add_argument("--input-format", choices=["auto", "jsonl", "parquet", "text"], default="auto",
                   help="auto: by extension (.jsonl/.json/.ndjson, .parquet, anything else is text), "
                        "after stripping .gz/.zst")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (exit 2, naming file:line)")
    p.add_argument("--allow-empty", action="store_true",
                   help="succeed when the inputs yield no document at all (default: an error naming the inputs "
                        "and why every record was skipped)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalm-prep", description="Corpora -> tokenizer -> Megatron MMIDIDX token shards.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json")
    _add_input_args(p)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, metavar="tokenizer.json")
    p.add_argument("--special-tokens", nargs="*", default=None, metavar="TOKEN",
                   help="special tokens (default and always included: <|endoftext|>)")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--split-digits", action="store_true",
                   help="one token per digit, as Llama's tokenizer does (numbers are never merged; arithmetic "
                        "and comparisons then generalise across numbers)")

    p = sub.add_parser("tokenize", help="tokenize corpora into .bin/.idx shards", epilog=TOKENIZE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_input_args(p)
    p.add_argument("--tokenizer", required=True, metavar="tokenizer.json", help="any Hugging Face tokenizer.json")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1: in this process)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    p.add_argument("--eod-token", default="<|endoftext|>", help="its spelling in the tokenizer (default <|endoftext|>)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--shard-size", type=int, default=None, metavar="TOKENS",
                       help="start a new shard once one holds this many tokens")
    group.add_argument("--num-shards", type=int, default=None, metavar="K",
                       help="K shards with equal numbers of input records")
    p.add_argument("--sft", action="store_true",
                   help="fine-tuning data: prompt/response or chat-messages JSONL records -> one padded sample of "
                        "--seq-len tokens per record plus a loss mask (prompt tokens are never trained on)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="with --sft: tokens per record, the training run's data.seq_len")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always draw the progress bar (default: only on a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("inspect", help="counts, length statistics and a decoded sample of an output")
    p.add_argument("prefix", metavar="PREFIX")
    p.add_argument("--tokenizer", default=None, help="decode with this tokenizer.json (default: the manifest's)")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="document to decode (default 0)")
    p.add_argument("--max-chars", type=int, default=600)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="describe the shards an unfinished tokenize has written so far (by default an output "
                        "whose manifest says complete: false is refused, as training refuses it)")

    p = sub.add_parser("merge", help="concatenate outputs of one dtype into a single shard")
    p.add_argument("--inputs", nargs="+", required=True, metavar="PREFIX")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")

    p = sub.add_parser("demo-corpus", help="tokenizer + shards from this Python's standard library (*.py)")
    p.add_argument("--output-dir", default="data/demo")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--num-shards", type=int, default=None)
    return parser


def _single_key(keys: Optional[list[str]]) -> str:
    keys = keys or ["text"]
    if len(keys) != 1:
        raise PrepError(f"--json-keys {' '.join(keys)}: give one key; megalm-prep writes one dataset per run "
                        f"(Megatron's preprocess_data.py writes one per key: run once per key)")
    return keys[0]


def run(args: argparse.Namespace) -> None:
    if args.command == "train-tokenizer":
        from data_prep.trainer import train_tokenizer

        train_tokenizer(args.input, args.vocab_size, args.output, json_key=_single_key(args.json_keys),
                        glob=args.glob, input_format=args.input_format, special_tokens=args.special_tokens,
                        min_frequency=args.min_frequency, strict=args.strict, allow_empty=args.allow_empty,
                        split_digits=args.split_digits)
    elif args.command == "tokenize":
        from data_prep.pipeline import TokenizeOptions, tokenize

        if args.sft and args.json_keys is not None:
            raise PrepError("--json-keys does not apply to --sft: its records are {prompt, response} or {messages}")
        tokenize(TokenizeOptions(
            inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
            json_key=_single_key(args.json_keys), workers=args.workers, append_eod=args.append_eod,
            eod_token=args.eod_token, glob=args.glob, input_format=args.input_format, shard_size=args.shard_size,
            num_shards=args.num_shards, strict=args.strict, allow_empty=args.allow_empty, progress=args.progress,
            sft=args.sft, seq_len=args.seq_len))
    elif args.command == "inspect":
        from data_prep.inspection import inspect_output

        inspect_output(args.prefix, tokenizer=args.tokenizer, sample=args.sample, max_chars=args.max_chars,
                       as_json=args.json, allow_incomplete=args.allow_incomplete)
    elif args.command == "merge":
        from data_prep.merge import merge

        merge(args.inputs, args.output_prefix)
    elif args.command == "demo-corpus":
        from data_prep.demo import build_demo_corpus

        build_demo_corpus(args.output_dir, vocab_size=args.vocab_size, workers=args.workers, num_shards=args.num_shards)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: Optional[list[str]] = None) -> int:
    # SIGTERM's default action kills the process on the spot: no cleanup, no message. As an exception
    # it unwinds like Ctrl-C. Only in the main thread (an embedding caller may run us elsewhere).
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if on_main_thread else None
    try:
        return _main(argv)
    finally:
        if on_main_thread:  # a caller that runs main() in-process (the tests) gets its own handler back
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main(argv: Optional[list[str]]) -> int:
    if hasattr(signal, "SIGUSR2"):  # the test harness asks hung processes for their stacks with SIGUSR2
        try:
            faulthandler.register(signal.SIGUSR2, all_threads=True)
        except (ValueError, OSError):  # stderr without a file descriptor (an embedding caller): no stacks
            pass
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except PrepError as exc:
        print(f"megalm-prep {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        name = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
        print(f"megalm-prep {args.command}: interrupted{name}", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
