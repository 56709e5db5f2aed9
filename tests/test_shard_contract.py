"""One definition of the shard contract: data_prep parses shards and expands shard paths; everyone imports it.

Three guards: (1) every caller of the expansion rule (megalm's data config, `megalm-prep inspect` and
`merge`) refuses an incomplete prep output, naming its manifest, unless inspect is told
`--allow-incomplete`; (2) a source scan that only data_prep/mmidx.py parses .idx bytes and only
data_prep/shards.py builds manifest paths; (3) megalm's reader and data_prep's give the same documents.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from data_prep.mmidx import Shard, ShardWriter
from data_prep.shards import ShardPathError, expand_shard_path
from megalm.config import ConfigError, DataConfig
from megalm.config import expand_shard_path as config_expand_shard_path
from megalm.data import IndexedDataset
from tests.prep_fixtures import read_docs
from tests.source_files import read_sources
from tests.train_fixtures import REPO


def _output(folder, name: str, docs_per_shard: list[list[list[int]]], complete: bool) -> str:
    """A megalm-prep-style output: PREFIX_NNNNN shards plus PREFIX.manifest.json saying `complete`."""
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(str(folder), name)
    entries = []
    for i, docs in enumerate(docs_per_shard):
        shard = f"{prefix}_{i:05d}"
        with ShardWriter(shard, np.uint16) as w:
            for d in docs:
                w.add_document(d)
        entries.append({"name": os.path.basename(shard), "documents": len(docs), "tokens": sum(map(len, docs))})
    with open(prefix + ".manifest.json", "w") as f:
        json.dump({"format": "megalm-prep-manifest", "version": 1, "complete": complete, "shards": entries}, f)
    return prefix


DOCS = [[[1, 2, 3], [4, 5]], [[6], [7, 8, 9, 10]]]


def _assert_names_incomplete_manifest(msg: str, prefix: str) -> None:
    assert prefix + ".manifest.json" in msg, msg
    assert "not complete" in msg and "re-run the same `megalm-prep tokenize`" in msg, msg


def test_every_caller_refuses_an_incomplete_output_naming_its_manifest(tmp_path, capsys):
    prefix = _output(tmp_path / "out", "c", DOCS, complete=False)
    with pytest.raises(ShardPathError) as e:
        expand_shard_path(prefix)
    _assert_names_incomplete_manifest(str(e.value), prefix)
    # megalm's config: the same rule, the message prefixed with the entry it came from
    for call in (lambda: config_expand_shard_path(prefix, "data.valid_paths[2]"),
                 lambda: DataConfig(train_paths=[prefix]).check_files()):
        with pytest.raises(ConfigError) as e:
            call()
        _assert_names_incomplete_manifest(str(e.value), prefix)
    assert str(e.value).startswith("data.train_paths[0]: ")
    # megalm-prep inspect and merge
    assert prep_main(["inspect", prefix]) == 2
    _assert_names_incomplete_manifest(capsys.readouterr().err, prefix)
    merged = str(tmp_path / "m" / "all")
    assert prep_main(["merge", "--inputs", prefix, "--output-prefix", merged]) == 2
    _assert_names_incomplete_manifest(capsys.readouterr().err, prefix)
    assert not os.path.exists(merged + ".idx") and not os.path.exists(merged + ".bin")
    # only the explicit flag reads the shards written so far
    assert expand_shard_path(prefix, allow_incomplete=True) == [prefix + "_00000", prefix + "_00001"]
    assert prep_main(["inspect", prefix, "--allow-incomplete"]) == 0
    out = capsys.readouterr().out
    assert "2 shard(s), dtype uint16, 4 documents, 10 tokens" in out and "manifest: INCOMPLETE" in out


def test_a_one_shard_output_is_refused_while_its_manifest_is_incomplete(tmp_path):
    # PREFIX.bin/.idx of a one-shard output appear before the manifest says complete: the manifest decides
    prefix = str(tmp_path / "one")
    with ShardWriter(prefix, np.uint16) as w:
        w.add_document([1, 2])
    with open(prefix + ".manifest.json", "w") as f:
        json.dump({"complete": False, "shards": [{"name": "one"}]}, f)
    with pytest.raises(ShardPathError, match="not complete"):
        expand_shard_path(prefix)
    with open(prefix + ".manifest.json", "w") as f:
        json.dump({"complete": True, "shards": [{"name": "one"}]}, f)
    assert expand_shard_path(prefix) == [prefix]


def test_complete_output_expands_the_same_everywhere(tmp_path, capsys):
    prefix = _output(tmp_path / "out", "c", DOCS, complete=True)
    shards = [prefix + "_00000", prefix + "_00001"]
    assert expand_shard_path(prefix) == config_expand_shard_path(prefix) == shards
    assert expand_shard_path(prefix + "_*") == config_expand_shard_path(prefix + "_*") == shards
    merged = str(tmp_path / "m" / "all")
    assert prep_main(["merge", "--inputs", prefix, "--output-prefix", merged]) == 0
    assert read_docs([merged]) == [d for docs in DOCS for d in docs]


def test_megalm_reader_and_data_prep_reader_give_identical_documents(tmp_path):
    rng = np.random.default_rng(3)
    for dtype, high in ((np.uint16, 65500), (np.int32, 2**31 - 1)):
        docs = [rng.integers(0, high, size=rng.integers(0, 30)).tolist() for _ in range(40)]
        prefix = str(tmp_path / f"s_{np.dtype(dtype).name}")
        with ShardWriter(prefix, dtype) as w:
            for d in docs:
                w.add_document(d)
        ours, theirs = IndexedDataset(prefix), Shard(prefix)
        assert len(ours) == len(theirs) == len(docs) and ours.dtype == theirs.dtype == np.dtype(dtype)
        assert [ours[i].tolist() for i in range(len(ours))] == [theirs[i].tolist() for i in range(len(theirs))]
        assert [ours[i].tolist() for i in range(len(ours))] == read_docs([prefix]) == docs  # and the spec parser
        assert ours.document_indices.tolist() == theirs.document_indices.tolist()


# --- source scan ------------------------------------------------------------------------------------------

SOURCE_DIRS = ("megalm", "data_prep", "launcher", "bench", "scripts")
READER = "data_prep/mmidx.py"
EXPANSION = "data_prep/shards.py"
# (what, regex, the one file allowed to match, the fix)
RULES = [
    ("the MMIDIDX magic bytes", re.compile(r"""b["']MMIDIDX"""), READER, "use data_prep.mmidx.Shard / read_index_header"),
    ("an .idx header offset", re.compile(r"\bHEADER_SIZE\b"), READER, "use data_prep.mmidx.Shard"),
    ("struct unpacking", re.compile(r"\bunpack(_from)?\("), READER, "use data_prep.mmidx.read_index_header"),
    ("a memory map of shard files", re.compile(r"np\.memmap\("), READER, "use data_prep.mmidx.Shard"),
    ("index arrays read from bytes", re.compile(r"(frombuffer\([^)]*|\.view\(\s*np\.)int(32|64)"), READER,
     "use data_prep.mmidx.Shard"),
    ("a manifest path built by hand", re.compile(r"""["']\.manifest\.json["']"""), EXPANSION,
     "use data_prep.shards.manifest_path / expand_shard_path"),
    ("a shard-path glob of .idx files", re.compile(r"""glob\([^)\n]*["']\.idx["']"""), EXPANSION,
     "use data_prep.shards.expand_shard_path"),
]


def _sources() -> list[tuple[str, str]]:
    return read_sources(SOURCE_DIRS, (".py",))


def test_only_data_prep_parses_shards_and_expands_shard_paths():
    sources = dict(_sources())
    for rel in (READER, EXPANSION, "megalm/data/indexed_dataset.py", "megalm/config/data.py"):
        assert rel in sources, f"scan found no {rel}"
    problems = []
    for what, pattern, allowed, fix in RULES:
        assert pattern.search(sources[allowed]), f"rule {what!r} no longer matches {allowed}: update the rule"
        for rel, text in sources.items():
            if rel != allowed:
                problems += [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {what} outside {allowed}; {fix}"
                             for m in pattern.finditer(text)]
    assert not problems, "\n".join(problems)
    # megalm's reader is data_prep's, not a copy that happens to agree
    assert IndexedDataset is Shard or issubclass(IndexedDataset, Shard)
