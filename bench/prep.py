"""Benchmark: `megalm-prep tokenize` throughput vs the raw `tokenizers` `encode_batch`, same run, same cores.

Corpus: the demo corpus (this interpreter's standard library, *.py). Baseline: `Tokenizer.encode_batch`
on the same texts, already in memory, with Rayon limited to --workers threads. Ours: the whole
pipeline with --workers processes (discovery, hashing, reading, tokenization, shard writing, manifest).
Prints one line each with tokens/s and MB/s, then the ratio (target >= 0.8), then the same pipeline
with the fast BPE path off (MEGALM_FAST_BPE=0) and the fast-BPE ratio line (target >= 2x). Best of --repeat runs,
alternating, because the machine may be shared. Then runs bench/index_build.py if it exists.

    python -m bench.prep [--workers 2] [--vocab-size 8192] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--train-mb", type=float, default=8.0, help="train the tokenizer on this much of the corpus")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    # Must precede the first Rayon use in this process (tokenizer training included): the baseline gets
    # exactly --workers threads, like our --workers processes.
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)

    from tokenizers import Tokenizer

    from data_prep.demo import stdlib_dir
    from data_prep.fast_bpe import fast_encoder_for
    from data_prep.pipeline import TokenizeOptions, tokenize
    from data_prep.sources import RecordReader, Skip, discover_inputs
    from data_prep.tokenizer import EOD_TOKEN, save_tokenizer, train_bpe

    work = tempfile.mkdtemp(prefix="megalm-bench-prep-")
    try:
        inputs = discover_inputs([stdlib_dir()], "*.py", "text")
        texts = [t for t in RecordReader(inputs).records() if not isinstance(t, Skip)]
        nbytes = sum(len(t.encode()) for t in texts)
        subset, size = [], 0
        for t in texts:
            if size >= args.train_mb * 1e6:
                break
            subset.append(t)
            size += len(t)
        tok_path = os.path.join(work, "tokenizer.json")
        save_tokenizer(train_bpe(subset, args.vocab_size, [EOD_TOKEN]), tok_path)
        tok = Tokenizer.from_file(tok_path)
        print(f"corpus: {len(texts)} documents, {nbytes / 1e6:.1f} MB from {len(inputs)} files under {stdlib_dir()}; "
              f"tokenizer: byte-level BPE, vocab {args.vocab_size}; workers: {args.workers}")

        # Two raw baselines: one encode_batch over all texts (as the library is usually called), and
        # encode_batch over the same ~256 KB batches our workers use (less memory churn: it holds the
        # Encodings of one batch, not of the whole corpus). The ratio is taken against the faster one.
        chunks, chunk, size = [], [], 0
        for t in texts:
            chunk.append(t)
            size += len(t)
            if len(chunk) >= 256 or size >= 1 << 18:
                chunks.append(chunk)
                chunk, size = [], 0
        chunks += [chunk] if chunk else []
        raw_best, chunked_best, ours_best, raw_tokens, ours_tokens = float("inf"), float("inf"), float("inf"), 0, 0
        slow_best = float("inf")
        fast, why_not = fast_encoder_for(tok_path)
        for r in range(args.repeat):
            t0 = time.perf_counter()
            encodings = tok.encode_batch(texts)
            raw_best = min(raw_best, time.perf_counter() - t0)
            raw_tokens = sum(len(e) for e in encodings)
            del encodings
            t0 = time.perf_counter()
            for c in chunks:
                tok.encode_batch(c)
            chunked_best = min(chunked_best, time.perf_counter() - t0)

            out = os.path.join(work, f"run{r}", "stdlib")
            t0 = time.perf_counter()
            manifest = tokenize(TokenizeOptions(inputs=[stdlib_dir()], tokenizer=tok_path, output_prefix=out,
                                                glob="*.py", input_format="text", workers=args.workers,
                                                progress=False), out=open(os.devnull, "w"), err=open(os.devnull, "w"))
            ours_best = min(ours_best, time.perf_counter() - t0)
            ours_tokens = manifest["tokens"]
            shutil.rmtree(os.path.dirname(out))

            # The same pipeline with the fast BPE path switched off (tokenizers in the workers).
            out = os.path.join(work, f"slow{r}", "stdlib")
            os.environ["MEGALM_FAST_BPE"] = "0"
            t0 = time.perf_counter()
            try:
                manifest = tokenize(TokenizeOptions(inputs=[stdlib_dir()], tokenizer=tok_path, output_prefix=out,
                                                    glob="*.py", input_format="text", workers=args.workers,
                                                    progress=False), out=open(os.devnull, "w"), err=open(os.devnull, "w"))
            finally:
                del os.environ["MEGALM_FAST_BPE"]
            slow_best = min(slow_best, time.perf_counter() - t0)
            assert manifest["tokens"] == raw_tokens
            shutil.rmtree(os.path.dirname(out))
        assert ours_tokens == raw_tokens, f"token counts differ: ours {ours_tokens}, raw {raw_tokens}"

        def line(name: str, secs: float) -> str:
            return (f"{name}: {raw_tokens} tokens in {secs:.2f} s = {raw_tokens / secs / 1e6:.3f} M tokens/s, "
                    f"{nbytes / secs / 1e6:.2f} MB/s")

        print(line(f"raw encode_batch, one call ({args.workers} Rayon threads, texts in memory)", raw_best))
        print(line(f"raw encode_batch, 256 KB batches ({args.workers} Rayon threads, texts in memory)", chunked_best))
        print(line(f"megalm-prep tokenize ({args.workers} worker processes, files to shards)", ours_best))
        base = min(raw_best, chunked_best)
        print(f"prep throughput ratio (megalm-prep / faster raw encode_batch): {base / ours_best:.3f} (target >= 0.8)")
        print(line(f"megalm-prep tokenize, fast BPE off (MEGALM_FAST_BPE=0, tokenizers in {args.workers} workers)",
                   slow_best))
        print(f"fast BPE: {'tiktoken core (ids proven identical to tokenizers)' if fast else 'off: ' + why_not}")
        print(f"fast-BPE prep ratio (megalm-prep {raw_tokens / ours_best / 1e6:.3f} M tok/s / raw encode_batch "
              f"{raw_tokens / base / 1e6:.3f} M tok/s): {base / ours_best:.2f}x (target >= 2x: "
              f"{'PASS' if base / ours_best >= 2 else 'FAIL'}); vs our own tokenizers path: {slow_best / ours_best:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    try:
        from bench.index_build import main as index_main
    except ImportError:
        print("bench/index_build.py not present: index-build benchmark skipped")
    else:
        index_main([])  # its defaults (1B tokens), not our command line


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
