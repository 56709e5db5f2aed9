"""`megalm-prep inspect PREFIX`: counts, dtype, document-length statistics and a decoded sample."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional, TextIO

import numpy as np

from data_prep.errors import PrepError
from data_prep.manifest import load_manifest
from data_prep.mmidx import Shard, ShardFormatError
from data_prep.shards import expand_shard_path
from data_prep.tokenizer import load_tokenizer


def inspect_output(prefix: str, tokenizer: Optional[str] = None, sample: int = 0, max_chars: int = 600,
                   as_json: bool = False, out: Optional[TextIO] = None, err: Optional[TextIO] = None,
                   allow_incomplete: bool = False) -> dict[str, Any]:
    """Print (and return) statistics of an output; decode document `sample` when a tokenizer is known.

    An output whose manifest says it is incomplete is refused like everywhere else, unless
    `allow_incomplete` (`--allow-incomplete`): then the shards finished so far are described."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        shards = [Shard(p) for p in expand_shard_path(prefix, allow_incomplete=allow_incomplete)]
    except ShardFormatError as exc:
        raise PrepError(str(exc)) from None
    if not shards:
        raise PrepError(f"{prefix}: the manifest lists no shards")
    dtypes = sorted({str(s.dtype) for s in shards})
    lengths = np.concatenate([s.sequence_lengths for s in shards]).astype(np.int64)
    manifest = load_manifest(prefix)
    stats: dict[str, Any] = {
        "prefix": prefix, "shards": [{"prefix": s.prefix, "documents": len(s),
                                      "tokens": s.num_tokens} for s in shards],
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "documents": int(lengths.size), "tokens": int(lengths.sum()),
        "length": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
                   "median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
                   "max": int(lengths.max())} if lengths.size else None,
        "manifest": None, "sample": None,
    }
    if manifest is not None:
        stats["manifest"] = {"complete": manifest.get("complete"), "skipped": manifest.get("skipped"),
                             "tokenizer_sha256": manifest.get("tokenizer", {}).get("sha256"),
                             "inputs": len(manifest.get("inputs", [])), "sft": manifest.get("sft")}
        if tokenizer is None:
            recorded = manifest.get("tokenizer", {}).get("path")
            tokenizer = recorded if recorded and os.path.isfile(recorded) else None
    if tokenizer is not None and lengths.size:
        tok = load_tokenizer(tokenizer)
        want = (manifest or {}).get("tokenizer", {}).get("sha256")
        if want and want != tok.sha256:
            print(f"warning: {tokenizer} (sha256 {tok.sha256[:12]}) is not the tokenizer the manifest records "
                  f"({want[:12]}); the decoded sample may be garbage", file=err)
        if not 0 <= sample < lengths.size:
            raise PrepError(f"--sample {sample}: there are {lengths.size} documents")
        at = sample
        for shard in shards:
            if at < len(shard):
                ids = shard[at]
                break
            at -= len(shard)
        text = tok.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        stats["sample"] = {"document": sample, "tokens": int(ids.size), "text": text[:max_chars],
                           "truncated": len(text) > max_chars}
    if as_json:
        json.dump(stats, out, indent=1)
        out.write("\n")
        return stats
    print(f"{prefix}: {len(shards)} shard(s), dtype {stats['dtype']}, {stats['documents']} documents, "
          f"{stats['tokens']} tokens", file=out)
    if stats["length"]:
        ln = stats["length"]
        print(f"document length (tokens): min {ln['min']}, mean {ln['mean']}, median {ln['median']:.0f}, "
              f"p90 {ln['p90']:.0f}, max {ln['max']}", file=out)
    if len(shards) > 1:
        for s in stats["shards"]:
            print(f"  {s['prefix']}: {s['documents']} documents, {s['tokens']} tokens", file=out)
    if stats["manifest"]:
        m = stats["manifest"]
        skipped = ", ".join(f"{k}={v}" for k, v in (m["skipped"] or {}).items()) or "none"
        print(f"manifest: {'complete' if m['complete'] else 'INCOMPLETE'}, {m['inputs']} input file(s), "
              f"skipped: {skipped}, tokenizer sha256 {str(m['tokenizer_sha256'])[:16]}", file=out)
        if m["sft"]:
            f = m["sft"]
            print(f"fine-tuning data: {f['layout']} to {f['seq_len']} tokens per record, template "
                  f"{f['template']['name']}, {f.get('target_tokens')} target tokens (loss mask beside each shard), "
                  f"{f.get('truncated')} truncated", file=out)
    if stats["sample"]:
        s = stats["sample"]
        print(f"--- document {s['document']} ({s['tokens']} tokens){', truncated' if s['truncated'] else ''} ---",
              file=out)
        print(s["text"], file=out)
        print("---", file=out)
    elif tokenizer is None:
        print("(no tokenizer given or recorded in the manifest: pass --tokenizer to decode a sample)", file=out)
    return stats
