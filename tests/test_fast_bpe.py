"""The tiktoken fast path (data_prep/fast_bpe.py) gives exactly the ids of `tokenizers`, or is not used."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

import tiktoken  # noqa: F401  (pinned: a missing install must fail, not skip)

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402

from data_prep.encoding import BatchEncoder  # noqa: E402
from data_prep.fast_bpe import Unsupported, build_encoding, bytes_to_unicode, fast_encoder_for  # noqa: E402
from data_prep.tokenizer import EOD_TOKEN, save_tokenizer, train_bpe  # noqa: E402
from tests.prep_fixtures import make_texts  # noqa: E402

SPECIALS = [EOD_TOKEN, "<|pad|>", "<|im_start|>", "<|im_end|>"]

ADVERSARIAL = [
    "", " ", "  ", "\n", "\r\n", "\t", " \t\r\n \n\n\n   ", "trailing spaces   ", "   leading", "a  b   c    d",
    "mixed\r\n\tline endings\r\r\n\n\t \t", "x \n y\t\n\tz \r\n", "tab\tsep\tvalues\t\t\n",
    "naïve café résumé Ünïcödé ß ẞ ſ ﬁ ﬀ", "e\u0301 a\u0308 o\u0302\u0323 ą\u0328 Z\u0351\u0352\u0353\u0354\u0355 \u0301\u0301",
    "中文字符 日本語のテキスト 한국어 텍스트", "Ελληνικά Русский עברית العربية हिन्दी ไทย",
    "🙂🙃😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈 🇫🇷🇩🇪 ❤️‍🔥", "math: ∑∫∂√∞ ≠ ≤ ≥ 𝔸𝔹ℂ 𝟘𝟙 ½ ² ³ Ⅻ ٣ ४ ๕",
    "zero\u200bwidth\u200cjoin\u200dner\ufeffbom", "nbsp\u00a0here\u2003em\u3000ideo\u2028line\u2029para\u0085nel",
    "\x00\x01\x02\x7f\x1b[31mred\x1b[0m", "it's they're we've I'm you'll he'd 'S 'T ''s '", "don't DON'T Don'T",
    "numbers 1234567890 ١٢٣ 3.14159 1e-10 0x1F 1,000,000", "!!!???... ---- ==== **** ####",
    "<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>", " <|endoftext|> ", "<|endoftext|",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|pad|><|pad|>x<|pad", "<|endoftext|>\n\n  <|pad|>",
    "def f(x):\n    return x  # comment   \n\n\n    \n", "\t\tif x:\n\t\t\tpass\r\n",
    "a" * 5000, " " * 4097, "\n" * 3000, "ab" * 3000, "🙂" * 2000, "1" * 7000, "é" * 3000, ("word " * 2000).strip(),
    "x" + " " * 1000 + "y", "\u0301" * 1000, "A\u030a" * 500,
]


def _fuzz(n: int, seed: int) -> list[str]:
    pool = list("aaeeiioo tthhnnss  \n\n\t\r'.,;:!?()[]{}<>|_-+=*/\\\"0123456789") + list("éüßçñ中文字한국🙂👍🏽\u0301\u00a0\u200b")
    pool += ["<|endoftext|>", "<|pad|>", "'s", "'ll", "   ", "\r\n", "<|", "|>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 400))) for _ in range(n)]


def _demo_texts(max_bytes: int) -> list[str]:
    from data_prep.demo import stdlib_dir
    from data_prep.sources import RecordReader, Skip, discover_inputs

    out, size = [], 0
    for item in RecordReader(discover_inputs([stdlib_dir()], "*.py", "text")).records():
        if isinstance(item, Skip):
            continue
        out.append(item)
        size += len(item)
        if size >= max_bytes:
            break
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A byte-level BPE trained like `megalm-prep train-tokenizer` on part of the demo corpus, plus texts."""
    texts = _demo_texts(3_000_000)
    train = texts[: len(texts) // 2] + ADVERSARIAL + make_texts(50)
    path = str(tmp_path_factory.mktemp("fastbpe") / "tokenizer.json")
    save_tokenizer(train_bpe(train, 4096, SPECIALS), path)
    return path, texts


def _assert_same(path: str, texts: list[str]) -> None:
    tok = Tokenizer.from_file(path)
    fast, why = fast_encoder_for(path)
    assert fast is not None, why
    expected = [e.ids for e in tok.encode_batch(texts)]
    for text, want in zip(texts, expected):
        got = fast.encode(text).tolist()
        assert got == want, f"ids differ on {text[:80]!r}"


def test_demo_corpus_ids_identical(demo):
    path, texts = demo
    _assert_same(path, texts)


def test_adversarial_ids_identical(demo):
    path, _ = demo
    _assert_same(path, ADVERSARIAL + _fuzz(400, seed=1))


def test_every_codepoint_plane_sample(demo):
    path, _ = demo
    rng = random.Random(3)
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    texts = ["".join(chr(rng.choice(cps)) + rng.choice(["", " ", "a", "1", "\n"]) for _ in range(200)) for _ in range(50)]
    _assert_same(path, texts)


def test_lone_surrogate_fails_like_tokenizers(demo):
    path, _ = demo
    fast, _ = fast_encoder_for(path)
    with pytest.raises(Exception):
        Tokenizer.from_file(path).encode("bad \ud800 text")
    with pytest.raises(Exception):
        fast.encode("bad \ud800 text")


def test_batch_encoder_uses_fast_path_and_matches(demo, monkeypatch):
    path, texts = demo
    texts = texts[:40] + ADVERSARIAL
    eod = Tokenizer.from_file(path).token_to_id(EOD_TOKEN)
    fast = BatchEncoder(path, "uint16", eod)
    assert fast.fast is not None, fast.fast_unsupported
    monkeypatch.setenv("MEGALM_FAST_BPE", "0")
    slow = BatchEncoder(path, "uint16", eod)
    assert slow.fast is None
    for a, b in zip(fast.encode(texts), slow.encode(texts)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert fast.encode([])[0].size == 0 and fast.encode([])[1].size == 0


def test_added_non_special_token_in_text(tmp_path):
    tok = train_bpe(make_texts(80), 500, [EOD_TOKEN])
    tok.add_tokens(["foo bar", "QQQ"])
    path = str(tmp_path / "tok.json")
    save_tokenizer(tok, path)
    _assert_same(path, ["x foo bar y", "foo barfoo bar", "QQQQ", "aQQQb foo", "the model " * 5])


def _manual_bpe(tmp_path, merges: list[tuple[str, str]], order=None) -> str:
    """Byte alphabet + the given merges, ids in merge order unless `order` permutes the merge results."""
    alphabet = sorted(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    results = [a + b for a, b in merges]
    for k, tokn in enumerate(order or results):
        vocab.setdefault(tokn, len(alphabet) + k)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path = str(tmp_path / f"manual{len(os.listdir(tmp_path))}.json")
    tok.save(path)
    return path


def test_detects_merge_order_that_tiktoken_would_not_follow(tmp_path):
    # "the" is made from "th"+"e", but "h"+"e" has priority: tokenizers encodes "the" as [t, he], while
    # tiktoken would take the whole piece "the" (and merge the phantom pair t+he).
    path = _manual_bpe(tmp_path, [("h", "e"), ("t", "h"), ("th", "e")])
    with pytest.raises(Unsupported, match="encodes to"):
        build_encoding(path)
    enc = BatchEncoder(path, "uint16", None)
    assert enc.fast is None
    flat, _ = enc.encode(["the"])
    assert flat.tolist() == Tokenizer.from_file(path).encode("the").ids


def test_consistent_manual_merges_are_accepted(tmp_path):
    path = _manual_bpe(tmp_path, [("t", "h"), ("h", "e"), ("th", "e"), ("Ġ", "the")])
    _assert_same(path, ["the", " the", "thethe he", "hthe th e", " the  the"])


def test_ids_out_of_merge_order_fall_back(tmp_path):
    path = _manual_bpe(tmp_path, [("t", "h"), ("a", "b")], order=["ab", "th"])
    with pytest.raises(Unsupported, match="merge order"):
        build_encoding(path)


@pytest.mark.parametrize("change", ["normalizer", "prefix_space", "template", "whitespace", "wordpiece", "prefix_special"])
def test_non_byte_level_tokenizers_fall_back(tmp_path, change):
    tok = train_bpe(make_texts(40), 400, [EOD_TOKEN])
    if change == "normalizer":
        tok.normalizer = normalizers.NFKC()
    elif change == "prefix_space":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    elif change == "template":
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOD_TOKEN}", special_tokens=[(EOD_TOKEN, 0)])
    elif change == "whitespace":
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    elif change == "wordpiece":
        tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    elif change == "prefix_special":
        tok.add_special_tokens(["<|endoftext|>x"])
    path = str(tmp_path / "tok.json")
    save_tokenizer(tok, path)
    fast, why = fast_encoder_for(path)
    assert fast is None and why
    enc = BatchEncoder(path, "int32", None)
    assert enc.fast is None
    texts = ["hello <|endoftext|>x world", "ab ab", "ﬁne café", ""]
    flat, lengths = enc.encode(texts)
    ref = Tokenizer.from_file(path)
    assert flat.tolist() == [i for t in texts for i in ref.encode(t).ids]
