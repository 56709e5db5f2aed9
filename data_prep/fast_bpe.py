"""A tiktoken encoder that produces exactly the ids of a byte-level BPE tokenizer.json, or a reason why not.

Hugging Face `tokenizers` and tiktoken run the same algorithm on GPT-2-style tokenizers: split the text on
added (special) tokens, split each remaining segment with the GPT-2 regex, and run BPE on the UTF-8 bytes
of each piece. tiktoken's core does it several times faster, so `megalm-prep tokenize` uses it whenever
`build_encoding` can prove the two give the same ids, and falls back to `tokenizers` otherwise.

The two BPE loops differ in two ways, and the checks here are what make them agree:

* tiktoken ranks a pair by the rank of the concatenated bytes, `tokenizers` by the merge rule for that
  exact pair. We give each merge result its tokenizer.json id as its rank, which orders pairs like the
  merge list when ids grow with merge order and no token is the result of two merges (checked). A pair
  whose concatenation is a token but which is no merge rule ("phantom" pair, e.g. `t`+`he` when `the`
  was made from `th`+`e`) is merged by tiktoken only. Suppose that happens first at some step of some
  piece: up to then both loops made the same merges, and the tokens x, y of the phantom pair were built
  by merges inside their own bytes only. Those merges run in the same relative order when
  `tokenizers` encodes the bytes of x+y alone, which would therefore end as [x, y] instead of [x+y].
  So "every merge result encodes to itself" (checked for the whole vocabulary) rules phantom merges out.
* tiktoken returns a piece that is itself a token without running BPE; by the same check `tokenizers`
  gets that token too.

Everything else must be the plain GPT-2 set-up (no normalizer, ByteLevel pre-tokenizer with the regex
and no prefix space, no post-processor that adds tokens, every byte in the vocabulary, added tokens
without strip/single-word flags and none a prefix of another, so leftmost-first and leftmost-longest
matching agree). Anything else returns a reason, and the caller uses `tokenizers`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

# The regex of the ByteLevel pre-tokenizer (use_regex=True), as `tokenizers` compiles it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Unsupported(Exception):
    """The tokenizer is not one tiktoken can reproduce exactly; the message says why."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _check_config(cfg: dict[str, Any]) -> None:
    if cfg.get("normalizer") is not None:
        raise Unsupported(f"has a normalizer ({cfg['normalizer'].get('type')})")
    if cfg.get("truncation") is not None or cfg.get("padding") is not None:
        raise Unsupported("has truncation or padding set")
    pre = cfg.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel":
        raise Unsupported(f"pre-tokenizer is {pre.get('type')!r}, not ByteLevel")
    if pre.get("add_prefix_space", False) or not pre.get("use_regex", True):
        raise Unsupported("ByteLevel pre-tokenizer with add_prefix_space or without the GPT-2 regex")
    post = cfg.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":  # ByteLevel post-processing only fixes offsets
        raise Unsupported(f"post-processor {post.get('type')!r} may add tokens")
    model = cfg.get("model") or {}
    if model.get("type") != "BPE":
        raise Unsupported(f"model is {model.get('type')!r}, not BPE")
    if model.get("dropout") not in (None, 0, 0.0):
        raise Unsupported("BPE dropout is set")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise Unsupported("BPE has a subword prefix or end-of-word suffix")
    if model.get("byte_fallback"):
        raise Unsupported("BPE uses byte_fallback")
    if model.get("ignore_merges"):
        raise Unsupported("BPE has ignore_merges=true")


def _special_tokens(cfg: dict[str, Any]) -> dict[str, int]:
    added = cfg.get("added_tokens") or []
    specials: dict[str, int] = {}
    groups: dict[bool, list[str]] = {False: [], True: []}
    for tok in added:
        if tok.get("single_word") or tok.get("lstrip") or tok.get("rstrip"):
            raise Unsupported(f"added token {tok['content']!r} has single_word/lstrip/rstrip")
        if not tok["content"]:
            raise Unsupported("an added token is empty")
        groups[bool(tok.get("normalized"))].append(tok["content"])
        specials[tok["content"]] = int(tok["id"])
    # tokenizers splits on non-normalized added tokens first, then on normalized ones inside what is left;
    # tiktoken finds all in one pass. Same result unless a token of one group can overlap one of the other.
    for a in groups[False]:
        for b in groups[True]:
            if a in b or b in a or any(a[-k:] == b[:k] or b[-k:] == a[:k] for k in range(1, min(len(a), len(b)))):
                raise Unsupported(f"added tokens {a!r} and {b!r} can overlap but are matched in different passes")
    contents = sorted(specials)
    for a, b in zip(contents, contents[1:]):  # sorted: a prefix sorts right before its extensions
        if b.startswith(a):
            raise Unsupported(f"added token {a!r} is a prefix of {b!r}")
    return specials


def mergeable_ranks(cfg: dict[str, Any]) -> dict[bytes, int]:
    """bytes -> id for the 256 bytes and every merge result, with the checks that ranks order like merges."""
    model = cfg["model"]
    vocab: dict[str, int] = model["vocab"]
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for b, c in bytes_to_unicode().items():
        if c not in vocab:
            raise Unsupported(f"byte {b:#04x} ({c!r}) is not in the vocabulary")
        ranks[bytes([b])] = vocab[c]
    last = -1
    for i, merge in enumerate(model.get("merges") or []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = a + b
        if a not in vocab or b not in vocab or token not in vocab:
            raise Unsupported(f"merge {i} ({a!r}, {b!r}) refers to tokens not in the vocabulary")
        tid = vocab[token]
        if tid <= last:
            raise Unsupported(f"merge {i} makes id {tid}, not above the previous merge's {last}: ids do not follow "
                              f"merge order (or {token!r} is made by two merges)")
        last = tid
        try:
            raw = bytes(char_to_byte[ch] for ch in token)
        except KeyError:
            raise Unsupported(f"merge result {token!r} has a character outside the byte-level alphabet") from None
        ranks[raw] = tid
    if len(set(ranks.values())) != len(ranks):
        raise Unsupported("two byte strings share an id")
    return ranks


def _check_merge_results_encode_to_themselves(tokenizer: Any, cfg: dict[str, Any]) -> None:
    model = tokenizer.model
    vocab = cfg["model"]["vocab"]
    for merge in cfg["model"].get("merges") or []:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        got = model.tokenize(a + b)
        if len(got) != 1:
            raise Unsupported(f"token {a + b!r} (id {vocab[a + b]}) encodes to {[t.value for t in got]} by its own "
                              f"merges, so tiktoken's rank order would differ from the merge list")


def build_encoding(tokenizer_path: str, tokenizer: Optional[Any] = None):
    """A tiktoken `Encoding` equivalent to the tokenizer.json at `tokenizer_path`, or raise `Unsupported`."""
    try:
        import tiktoken
    except ImportError:
        raise Unsupported("tiktoken is not installed") from None
    with open(tokenizer_path, encoding="utf-8") as f:
        cfg = json.load(f)
    _check_config(cfg)
    specials = _special_tokens(cfg)
    ranks = mergeable_ranks(cfg)
    if tokenizer is None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tokenizer_path)
    _check_merge_results_encode_to_themselves(tokenizer, cfg)
    try:
        return tiktoken.Encoding(name="megalm-bytelevel-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=specials)
    except Exception as exc:  # noqa: BLE001 - whatever tiktoken refuses, we fall back
        raise Unsupported(f"tiktoken refused the vocabulary: {exc}") from None


class FastEncoder:
    """Encodes documents with tiktoken's core into uint32 arrays, recognising every added token in text
    (as `Tokenizer.encode` does)."""

    def __init__(self, encoding: Any):
        self.encoding = encoding
        self._core = encoding._core_bpe
        self._allowed = encoding.special_tokens_set

    def encode(self, text: str) -> np.ndarray:
        # Straight to the core: Encoding.encode would silently replace lone surrogates, where
        # `tokenizers` raises; this raises too (UnicodeEncodeError).
        return np.frombuffer(self._core.encode_to_tiktoken_buffer(text, self._allowed), dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]


def fast_encoder_for(tokenizer_path: str, tokenizer: Optional[Any] = None) -> tuple[Optional[FastEncoder], str]:
    """(encoder, "") when tiktoken reproduces the tokenizer exactly, else (None, why not).

    MEGALM_FAST_BPE=0 in the environment turns the fast path off (benchmarks, debugging)."""
    if os.environ.get("MEGALM_FAST_BPE", "1") == "0":
        return None, "disabled by MEGALM_FAST_BPE=0"
    try:
        return FastEncoder(build_encoding(tokenizer_path, tokenizer)), ""
    except Unsupported as exc:
        return None, str(exc)
