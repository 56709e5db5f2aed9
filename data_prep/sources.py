"""Input discovery and record readers: JSONL, Parquet and plain-text trees, optionally .gz / .zst.

A *record* is one unit of input in a fixed order: a non-blank JSONL line, a Parquet row, or a text
file. Readers yield, per record, either the document text or a `Skip` that says why it is unusable and
where (file:line), so the pipeline can count skips by reason and `--strict` can stop at the first one.
The record order depends only on the inputs (files sorted within each glob/directory, inputs in the
order given), which is what makes the output independent of the number of workers.
"""
from __future__ import annotations

import collections
import fnmatch
import glob as globlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, TextIO, Union

from data_prep.decompress import compression_of, open_binary  # noqa: F401 - open_binary is part of this API
from data_prep.errors import PrepError

FORMATS = ("auto", "jsonl", "parquet", "text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# Walking a directory never enters these: byte-compiled caches and third-party packages are not part
# of a text tree such as the Python standard library (a source-built Python keeps site-packages
# *inside* its stdlib directory), and hidden directories are VCS/tool state.
PRUNED_DIRS = ("__pycache__", "site-packages", "dist-packages")

SKIP_REASONS = ("malformed_json", "missing_field", "non_utf8", "empty")


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "jsonl" | "parquet" | "text"
    compression: Optional[str]  # "gz" | "zst" | None


@dataclass(frozen=True)
class Skip:
    reason: str  # one of SKIP_REASONS
    where: str  # "file:line" (or "file:row N" for Parquet)
    detail: str
    keys: tuple[str, ...] = ()  # missing_field on a JSON object: the keys it has (to suggest --json-keys)


@dataclass(frozen=True)
class JsonObject:
    """A whole JSONL record (RecordReader with whole_objects=True: fine-tuning data, data_prep/sft.py)."""
    value: dict
    where: str  # "file:line"


Record = Union[str, Skip, JsonObject]


def _kind(path: str, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    base = path
    for ext in (".gz", ".zst", ".zstd"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if base.endswith(".parquet"):
        return "parquet"
    return "text"


def _walk(directory: str, pattern: Optional[str]) -> list[str]:
    """Files under `directory` sorted by relative path (deterministic on any filesystem), pruning
    PRUNED_DIRS and hidden directories. Directory symlinks are not followed.

    `pattern` matches the file name (`*.py`) or, when it contains '/', the path relative to `directory`.
    """
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in PRUNED_DIRS and not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            if pattern is not None:
                target = os.path.relpath(full, directory) if "/" in pattern else name
                if not fnmatch.fnmatch(target, pattern):
                    continue
            found.append(full)
    return sorted(found, key=lambda p: os.path.relpath(p, directory).split(os.sep))


def discover_inputs(specs: list[str], pattern: Optional[str] = None, input_format: str = "auto") -> list[InputFile]:
    """Expand files, globs and directories into an ordered file list; fail naming the spec that is empty."""
    if input_format not in FORMATS:
        raise PrepError(f"--input-format {input_format!r}: expected one of {', '.join(FORMATS)}")
    paths: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = _walk(spec, pattern)
            if not found:
                raise PrepError(f"input directory {spec!r}: no files match --glob {pattern!r}" if pattern
                                else f"input directory {spec!r} contains no files")
            paths.extend(found)
        elif os.path.isfile(spec):
            paths.append(spec)
        elif globlib.has_magic(spec):
            found = sorted(p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise PrepError(f"input glob {spec!r} matches no files")
            paths.extend(found)
        else:
            raise PrepError(f"input {spec!r} does not exist")
    seen: set[str] = set()
    inputs = []
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:  # the same file named twice (e.g. by two globs) is read once
            continue
        seen.add(key)
        inputs.append(InputFile(p, _kind(p, input_format), compression_of(p)))
    return inputs


def check_parquet_columns(inputs: list[InputFile], column: str) -> None:
    """A Parquet file without the text column is a configuration error: say so before any work."""
    for inp in inputs:
        if inp.kind != "parquet":
            continue
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(inp.path).names
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
            raise PrepError(f"input {inp.path!r}: not a readable Parquet file ({exc})") from None
        if column not in names:
            raise PrepError(f"input {inp.path!r}: Parquet file has no column {column!r} "
                            f"(columns: {', '.join(names)}); choose one with --json-keys/--column")


class SkipCounter:
    """Counts skipped records by reason, names the first few on stderr, and enforces --strict."""

    def __init__(self, strict: bool, report: int, err: TextIO, reasons: tuple[str, ...] = SKIP_REASONS):
        self.counts = {reason: 0 for reason in reasons}
        self.strict, self.report, self.err = strict, report, err
        self.keys_seen: collections.Counter[str] = collections.Counter()  # of JSON objects without the key

    def add(self, skip: Skip) -> None:
        if self.strict:
            raise PrepError(f"{skip.where}: {skip.reason.replace('_', ' ')}: {skip.detail} (--strict)")
        self.counts[skip.reason] += 1
        self.keys_seen.update(skip.keys)
        total = sum(self.counts.values())
        if total <= self.report:
            print(f"skipped {skip.where}: {skip.reason}: {skip.detail}", file=self.err)
        elif total == self.report + 1:
            print("(further skipped records are counted, not listed)", file=self.err)


def no_documents_error(inputs: list[InputFile], records: int, skips: SkipCounter, key: str) -> PrepError:
    """Why a run found no document at all: an output or tokenizer made of nothing is almost always a
    wrong --json-keys or a wrong file, so it is an error (unless --allow-empty) that names the inputs
    and counts the skips by reason."""
    names = ", ".join(repr(i.path) for i in inputs[:3]) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
    allow = "or pass --allow-empty if an empty output is expected"
    if records == 0:
        return PrepError(f"no documents in {names}: {'it holds' if len(inputs) == 1 else 'they hold'} no records: "
                         f"check the input, {allow}")
    counts = ", ".join(f"{reason}: {n}" for reason, n in skips.counts.items() if n)
    hint, fix = "", "fix the input or the options"
    if skips.keys_seen:
        keys = sorted(k for k, _ in skips.keys_seen.most_common(10))
        hint = f" — --json-keys {key} not found; the records have keys {keys}"
        fix = "name the text field with --json-keys"
    return PrepError(f"no documents in {names}: {records} records, all skipped ({counts}{hint}): {fix}, {allow}")


class RecordReader:
    """Reads the records of all inputs in order. `bytes_read` (uncompressed) feeds the MB/s figure.
    `whole_objects=True` (JSONL only) yields each JSON object as a JsonObject instead of its `key` field."""

    def __init__(self, inputs: list[InputFile], key: str = "text", whole_objects: bool = False):
        self.inputs = inputs
        self.key = key
        self.whole_objects = whole_objects
        self.bytes_read = 0
        self.count = 0  # records yielded so far

    def records(self) -> Iterator[Record]:
        for inp in self.inputs:
            if inp.kind == "jsonl":
                items: Iterator[Record] = self._jsonl(inp.path)
            elif inp.kind == "parquet":
                items = self._parquet(inp.path)
            else:
                items = iter((self._text(inp.path),))
            for item in items:
                self.count += 1
                yield item

    def _text(self, path: str) -> Record:
        with open_binary(path) as f:
            data = f.read()
        self.bytes_read += len(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            return Skip("non_utf8", f"{path}:{line}", f"byte {data[exc.start]:#04x} at offset {exc.start} is not UTF-8")
        if not text or text.isspace():
            return Skip("empty", f"{path}:1", "file has no text")
        return text

    def _jsonl(self, path: str) -> Iterator[Record]:
        key = self.key
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                self.bytes_read += len(raw)
                if raw.isspace() or not raw:
                    continue  # blank lines (e.g. a trailing one) are not records
                try:
                    line = raw.rstrip(b"\r\n").decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield Skip("non_utf8", f"{path}:{lineno}", f"byte {raw[exc.start]:#04x} at column {exc.start + 1} is not UTF-8")
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    yield Skip("malformed_json", f"{path}:{lineno}", f"invalid JSON: {exc}")
                    continue
                if self.whole_objects:
                    yield (JsonObject(obj, f"{path}:{lineno}") if isinstance(obj, dict) else
                           Skip("missing_field", f"{path}:{lineno}", "the line is not a JSON object"))
                    continue
                text = obj.get(key) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    what = ("the line is not a JSON object" if not isinstance(obj, dict)
                            else f"no field {key!r}" if key not in obj
                            else f"field {key!r} is {type(text).__name__}, not a string")
                    yield Skip("missing_field", f"{path}:{lineno}", what,
                               tuple(obj) if isinstance(obj, dict) and key not in obj else ())
                    continue
                if not text or text.isspace():
                    yield Skip("empty", f"{path}:{lineno}", f"field {key!r} is empty")
                    continue
                yield text

    def _parquet(self, path: str) -> Iterator[Record]:
        import pyarrow.parquet as pq  # imported lazily: JSONL/text runs do not pay for pyarrow

        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=[self.key]):
            column = batch.column(0)
            self.bytes_read += column.nbytes
            for value in column.to_pylist():
                row += 1
                if isinstance(value, bytes):  # binary column: validate UTF-8 ourselves
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        yield Skip("non_utf8", f"{path}:row {row}", f"byte at offset {exc.start} is not UTF-8")
                        continue
                if not isinstance(value, str):
                    yield Skip("missing_field", f"{path}:row {row}", f"column {self.key!r} is null")
                    continue
                if not value or value.isspace():
                    yield Skip("empty", f"{path}:row {row}", f"column {self.key!r} is empty")
                    continue
                yield value


def count_records(inputs: list[InputFile]) -> int:
    """How many records the inputs hold (for --num-shards), without parsing them."""
    total = 0
    for inp in inputs:
        if inp.kind == "text":
            total += 1
        elif inp.kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(inp.path).metadata.num_rows
        else:
            with open_binary(inp.path) as f:
                total += sum(1 for raw in f if raw and not raw.isspace())
    return total
