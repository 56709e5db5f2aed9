"""`megalm-prep tokenize`: inputs -> worker processes -> ordered shards + manifest, resumable.

Everything that can fail because of the user's arguments (inputs, tokenizer, output directory, option
combinations) is checked before the first document is read. The main process reads and validates
records, batches documents for the workers, and writes their results in input order. With `sft`
(`--sft --seq-len N`) the records are prompt/response or chat objects and the output is padded token
shards plus a loss mask (data_prep/sft.py); everything else (resume, workers, layouts) is the same.
"""
from __future__ import annotations

import glob as globlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, TextIO

import numpy as np

from data_prep import sft as sft_format
from data_prep.encoding import EncoderPool
from data_prep.errors import PrepError
from data_prep.manifest import (MANIFEST_FORMAT, MANIFEST_VERSION, SHARD_NAMING, describe_inputs, fingerprint,
                                load_manifest, shard_problem, write_manifest)
from data_prep.output_dir import prepare_output_dir
from data_prep.mmidx import CODE_OF_DTYPE, data_path, index_path, token_dtype
from data_prep.progress import Progress
from data_prep.sharding import ShardSink
from data_prep.shards import loss_mask_prefix
from data_prep.sources import (SKIP_REASONS, InputFile, RecordReader, Skip, SkipCounter, check_parquet_columns,
                               count_records, discover_inputs, no_documents_error)
from data_prep.tokenizer import EOD_TOKEN, load_tokenizer


@dataclass
class TokenizeOptions:
    inputs: list[str]
    tokenizer: str
    output_prefix: str
    json_key: str = "text"
    workers: int = 1
    append_eod: bool = False
    eod_token: str = EOD_TOKEN
    glob: Optional[str] = None
    input_format: str = "auto"
    shard_size: Optional[int] = None  # tokens per shard (--shard-size)
    num_shards: Optional[int] = None  # number of shards by input record (--num-shards)
    strict: bool = False
    allow_empty: bool = False  # --allow-empty: an output without documents is not an error
    progress: Optional[bool] = None  # None: a bar only when stderr is a terminal
    sft: bool = False  # --sft: prompt/response or chat records -> padded shards + loss mask (data_prep/sft.py)
    seq_len: Optional[int] = None  # --seq-len: tokens per SFT record (= the training data.seq_len)
    report_skips: int = 5  # how many skipped records to name on stderr
    batch_documents: int = 256
    batch_bytes: int = 1 << 18  # small batches keep both workers busy around very long documents

    def shaping(self) -> dict[str, Any]:
        """The options that change the shard bytes (part of the resume fingerprint)."""
        shaping = {"json_key": self.json_key, "append_eod": self.append_eod, "eod_token": self.eod_token,
                   "glob": self.glob, "input_format": self.input_format, "shard_size": self.shard_size,
                   "num_shards": self.num_shards}
        if self.sft:  # only then: pre-training outputs keep their fingerprints
            shaping.update(sft=True, seq_len=self.seq_len, template=sft_format.TEMPLATE["name"])
        return shaping


def _remove_stale(prefix: str, old: Optional[dict[str, Any]]) -> None:
    """Delete temporary files of interrupted writers and the shards of an outdated manifest."""
    base = os.path.dirname(prefix)
    tmps = globlib.glob(globlib.escape(prefix) + "_" + "[0-9]" * 5 + ".*.tmp")
    for one in (prefix, loss_mask_prefix(prefix)):
        tmps += [data_path(one) + ".tmp", index_path(one) + ".tmp"]
    for path in tmps:
        if os.path.exists(path):
            os.unlink(path)
    for entry in (old or {}).get("shards", []):
        shard = os.path.join(base, entry["name"])
        for one in (shard, loss_mask_prefix(shard)):
            for path in (index_path(one), data_path(one)):
                if os.path.exists(path):
                    os.unlink(path)


def _batches(reader: RecordReader, skips: SkipCounter, first_record: int, max_docs: int,
             max_bytes: int) -> Iterator[tuple[tuple[np.ndarray, int], list[str]]]:
    """Group documents into worker batches; metadata = (record index of each document, input bytes)."""
    texts: list[str] = []
    records: list[int] = []
    size = 0
    mark = 0
    for rec, item in enumerate(reader.records()):
        if isinstance(item, Skip):
            skips.add(item)
            continue
        if rec < first_record:  # already in a shard kept from an earlier run
            continue
        texts.append(item)
        records.append(rec)
        size += len(item)
        if len(texts) >= max_docs or size >= max_bytes:
            yield (np.asarray(records, dtype=np.int64), reader.bytes_read - mark), texts
            mark = reader.bytes_read
            texts, records, size = [], [], 0
    if texts:
        yield (np.asarray(records, dtype=np.int64), reader.bytes_read - mark), texts


def _layout(opts: TokenizeOptions) -> str:
    if opts.shard_size is not None:
        return "size"
    if opts.num_shards is not None and opts.num_shards > 1:
        return "count"
    return "single"


def _check_options(opts: TokenizeOptions) -> None:
    if opts.workers < 1:
        raise PrepError(f"--workers {opts.workers}: must be >= 1")
    if opts.shard_size is not None and opts.num_shards is not None:
        raise PrepError("--shard-size and --num-shards are alternatives: give one of them")
    if opts.shard_size is not None and opts.shard_size < 1:
        raise PrepError(f"--shard-size {opts.shard_size}: must be >= 1 token")
    if opts.num_shards is not None and opts.num_shards < 1:
        raise PrepError(f"--num-shards {opts.num_shards}: must be >= 1")
    if opts.sft and opts.seq_len is None:
        raise PrepError("--sft needs --seq-len N (the training run's data.seq_len): each record becomes one "
                        "sample of N tokens")
    if not opts.sft and opts.seq_len is not None:
        raise PrepError(f"--seq-len {opts.seq_len} applies to --sft only: pre-training data is cut into "
                        f"samples of data.seq_len tokens when training; drop --seq-len or add --sft")
    if opts.seq_len is not None and opts.seq_len < 2:
        raise PrepError(f"--seq-len {opts.seq_len}: must be >= 2 (room for a prompt and a response token)")


def _check_sft_inputs(inputs: list[InputFile]) -> None:
    for inp in inputs:
        if inp.kind != "jsonl":
            raise PrepError(f"input {inp.path!r}: --sft reads JSONL records ({{\"prompt\", \"response\"}} or "
                            f"{{\"messages\"}}), not {inp.kind} input; convert it to JSONL")


def tokenize(opts: TokenizeOptions, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> dict[str, Any]:
    """Run (or resume) a tokenization; returns the final manifest."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    start = time.perf_counter()
    _check_options(opts)
    inputs = discover_inputs(opts.inputs, opts.glob, opts.input_format)
    check_parquet_columns(inputs, opts.json_key)
    if opts.sft:
        _check_sft_inputs(inputs)
    tok = load_tokenizer(opts.tokenizer)
    eod_id = None
    if opts.append_eod or opts.sft:
        eod_id = tok.token_id(opts.eod_token)
        if eod_id is None:
            why = "--sft (it ends every response and pads)" if opts.sft else "--append-eod"
            raise PrepError(f"tokenizer file {opts.tokenizer!r} has no end-of-document token {opts.eod_token!r} "
                            f"for {why}; name one it has with --eod-token")
    dtype = token_dtype(tok.vocab_size)
    prefix = opts.output_prefix
    prepare_output_dir(prefix)

    described = describe_inputs([i.path for i in inputs])
    fp = fingerprint(described, tok.sha256, opts.shaping())
    layout = _layout(opts)

    # Resume: keep the leading shards of an earlier run with the same fingerprint that still verify.
    old = load_manifest(prefix)
    kept: list[dict[str, Any]] = []
    if old is not None and old.get("fingerprint") == fp:
        base = os.path.dirname(prefix)
        for entry in old.get("shards", []):
            problem = shard_problem(os.path.join(base, entry["name"]), entry, str(dtype))
            if problem is not None:
                print(f"resume: redoing from shard {entry['name']}: {problem}", file=err)
                break
            kept.append(entry)
        if old.get("complete") and len(kept) == len(old.get("shards", [])):
            print(f"{prefix}: already complete ({len(kept)} shard(s), {old['documents']} documents, "
                  f"{old['tokens']} tokens); nothing to do", file=out)
            return old
        old = {"shards": old.get("shards", [])[len(kept):]}  # only the unusable ones get deleted
    if layout == "single":
        kept = []  # a single shard is all or nothing
    _remove_stale(prefix, old)
    if kept:
        print(f"resume: keeping {len(kept)} complete shard(s) from an earlier run "
              f"({sum(e['documents'] for e in kept)} documents); skipping their records", file=err)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "complete": False,
        "prefix": os.path.basename(prefix), "shard_naming": SHARD_NAMING,
        "tokenizer": {"path": os.path.abspath(opts.tokenizer), "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "eod_token": opts.eod_token if opts.append_eod else None, "eod_id": eod_id},
        "dtype": str(dtype), "dtype_code": CODE_OF_DTYPE[dtype],
        "options": opts.shaping(), "fingerprint": fp,
        "inputs": described, "input_bytes": sum(i["bytes"] for i in described),
        "records": None, "documents": 0, "tokens": 0, "skipped": {}, "elapsed_seconds": None,
        "shards": list(kept),
    }
    if opts.sft:
        manifest["sft"] = sft_format.manifest_section(opts.seq_len, eod_id, opts.eod_token)
    write_manifest(prefix, manifest)

    bounds = None
    if layout == "count":
        total = count_records(inputs)
        bounds = np.asarray([(k * total) // opts.num_shards for k in range(opts.num_shards + 1)], dtype=np.int64)

    def shard_done(entry: dict[str, Any]) -> None:
        manifest["shards"].append(entry)
        write_manifest(prefix, manifest)

    first_record = kept[-1]["records"][1] if kept else 0
    sink = ShardSink(prefix, dtype, layout, shard_size=opts.shard_size, record_bounds=bounds,
                     first_shard=len(kept), first_record=first_record, on_shard_done=shard_done, loss_mask=opts.sft)
    reader = RecordReader(inputs, opts.json_key, whole_objects=opts.sft)
    skips = SkipCounter(opts.strict, opts.report_skips, err,
                        SKIP_REASONS + sft_format.SKIP_REASONS if opts.sft else SKIP_REASONS)
    truncated = 0  # SFT records cut after seq_len tokens
    for entry in kept:  # what the kept shards' records lost after encoding is not seen again
        for what, n in entry.get("sft_counts", {}).items():
            if what == "truncated":
                truncated += n
            else:
                skips.counts[what] += n
    compressed = any(i.compression or i.kind == "parquet" for i in inputs)
    progress = Progress(None if compressed else manifest["input_bytes"], opts.progress, err)
    try:
        # SFT appends the EOD id itself (after each response, not after each encoded piece).
        with EncoderPool(opts.workers, opts.tokenizer, str(dtype), None if opts.sft else eod_id) as pool:
            if opts.sft:
                rendered = sft_format.render_batches(reader, skips, first_record, opts.batch_documents,
                                                     opts.batch_bytes)
                for (records, nbytes, sft_records), (flat, lengths) in pool.map(rendered):
                    fitted = sft_format.fit_batch(sft_records, records, flat, lengths, eod_id, opts.seq_len, dtype)
                    for rec, skip in fitted.skipped:
                        skips.add(skip)
                        sink.count(rec, skip.reason)
                    for rec in fitted.truncated:
                        sink.count(rec, "truncated")
                    truncated += len(fitted.truncated)
                    sink.add(fitted.tokens, fitted.lengths, fitted.records, fitted.mask)
                    progress.update(len(fitted.lengths), int(fitted.tokens.size), nbytes)
            else:
                batches = _batches(reader, skips, first_record, opts.batch_documents, opts.batch_bytes)
                for (records, nbytes), (flat, lengths) in pool.map(batches):
                    sink.add(flat, lengths, records)
                    progress.update(len(lengths), int(flat.size), nbytes)
        if progress.documents + sum(e["documents"] for e in kept) == 0 and not opts.allow_empty:
            raise no_documents_error(inputs, reader.count, skips, opts.json_key)
        sink.finish(reader.count)
    except BaseException as exc:
        sink.abort()
        progress.close()
        if isinstance(exc, PrepError):
            # A bad input or record stops the run like an interruption: temporary files are gone, the
            # shards finished so far stay listed under "complete": false (training refuses them), and
            # the manifest says why. A fixed input (or --json-keys) changes the fingerprint: the re-run
            # starts over; with --allow-empty nothing changes it, so that re-run just completes.
            manifest["error"] = str(exc)
            write_manifest(prefix, manifest)
        raise
    progress.close()

    shards = manifest["shards"]
    if layout == "size" and len(shards) == 1 and shards[0]["name"] != os.path.basename(prefix):
        # One shard after all: give it the bare prefix so it is directly usable. .idx goes last, so an
        # interruption here leaves PREFIX_00000 incomplete (redone on resume), never a bad PREFIX.
        only = os.path.join(os.path.dirname(prefix), shards[0]["name"])
        if opts.sft:  # the mask first: the token .idx appears last
            os.replace(data_path(loss_mask_prefix(only)), data_path(loss_mask_prefix(prefix)))
            os.replace(index_path(loss_mask_prefix(only)), index_path(loss_mask_prefix(prefix)))
            shards[0]["loss_mask"]["name"] = os.path.basename(loss_mask_prefix(prefix))
        os.replace(data_path(only), data_path(prefix))
        os.replace(index_path(only), index_path(prefix))
        shards[0]["name"] = os.path.basename(prefix)
    manifest.update({
        "complete": True, "records": reader.count,
        "documents": sum(e["documents"] for e in shards), "tokens": sum(e["tokens"] for e in shards),
        "skipped": {k: v for k, v in skips.counts.items() if v}, "elapsed_seconds": round(time.perf_counter() - start, 3),
    })
    fine_tuning = ""
    if opts.sft:
        targets = sum(e["loss_mask"]["target_tokens"] for e in shards)
        manifest["sft"].update(truncated=truncated, target_tokens=targets)
        fine_tuning = (f"; fine-tuning: {targets} target tokens, padded to {opts.seq_len} per record, "
                       f"{truncated} truncated")
    write_manifest(prefix, manifest)
    skipped = sum(skips.counts.values())
    why = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items())
    print(f"{prefix}: {manifest['documents']} documents, {manifest['tokens']} tokens ({manifest['dtype']}) in "
          f"{len(shards)} shard(s); {skipped} skipped{f' ({why})' if why else ''}{fine_tuning}; "
          f"{manifest['input_bytes'] / 1e6:.1f} MB from {len(described)} file(s) in "
          f"{manifest['elapsed_seconds']:.2f} s; {progress.rates()}", file=out)
    return manifest

