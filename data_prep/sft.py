"""Fine-tuning (SFT) data: prompt/response and chat records as padded token shards plus a loss mask.

`megalm-prep tokenize --sft --seq-len N` reads JSONL records of two kinds, told apart per record (a
"messages" key means chat):

    {"prompt": "...", "response": "..."}                                         prompt-response
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}    messages

Each record is rendered into text pieces by TEMPLATE (defined here only, recorded in the manifest), each
piece trained on or not:

    prompt-response   PROMPT  RESPONSE <eod>            no separator is added: end the prompt with one
    messages          per turn  HEADER CONTENT END      HEADER "System:\\n" | "User:\\n" | "Assistant:\\n";
                                                        END "\\n\\n" after system/user, <eod> after assistant
    trained           RESPONSE and its <eod>; every assistant CONTENT and its <eod>. Nothing else.

Pieces are tokenised one by one and their ids concatenated, so every token belongs to one piece and the
mask is exact (no BPE merge spans a prompt/response boundary); decoding the ids gives the rendered text.

Storage: one record is one document of exactly N tokens, i.e. one training sample (layout "padded"):

    PREFIX.bin / .idx            Megatron MMIDIDX v1 tokens as for pre-training: the record's tokens,
                                 cut after N (counted as truncated), then padded to N with the EOD id
    PREFIX.loss_mask.bin / .idx  an MMIDIDX shard of uint8 (`data_prep.shards.loss_mask_prefix`) with the
                                 same document lengths: 1 where the token is a training target, 0 on
                                 prompt tokens, role headers and padding; position 0 is always 0

The manifest lists each shard's mask ("loss_mask": name, bytes, hash, target tokens) and says what the
output is ("sft": layout, seq_len, pad and EOD ids, the template). Any MMIDIDX reader reads both files.

Training (megalm.data): GPTDataset's sample j is the token stream's [j*N, j*N + N]; with documents of
exactly N tokens that is record j plus the first token of the next one. The label of input position i
is token i + 1, kept where mask[i + 1] is 1 and IGNORE_INDEX elsewhere, so the last position (whose
label is the next record's first token, mask 0) and every prompt and pad label predict nothing. Each
sample holds one record starting at position 0, so causal attention alone keeps records apart (DESIGN
decision 40): no document-causal mask is needed. data.seq_len must equal N (checked).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import numpy as np

from data_prep.mmidx import Shard, ShardFormatError
from data_prep.shards import loss_mask_of
from data_prep.sources import JsonObject, RecordReader, Skip, SkipCounter

PROMPT_RESPONSE = "prompt-response"
MESSAGES = "messages"
ROLES = ("system", "user", "assistant")
ROLE_HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}
TURN_END = "\n\n"  # after a system or user turn; an assistant turn ends with the EOD token instead
LAYOUT = "padded"
LOSS_MASK_DTYPE = np.dtype(np.uint8)
SKIP_REASONS = ("unknown_role", "no_assistant_turn", "prompt_too_long")
TEMPLATE: dict[str, Any] = {
    "name": "megalm-sft-v1",
    PROMPT_RESPONSE: "{prompt}{response}<eod>",
    MESSAGES: {"role_headers": ROLE_HEADERS, "system_user_end": TURN_END, "assistant_end": "<eod>",
               "turn": "{header}{content}{end}"},
    "trained": "the response and its <eod>; each assistant content and its <eod>",
    "pieces": "each piece tokenised on its own, ids concatenated",
}

EOD = None  # a piece that stands for the end-of-document token, not for text
Piece = tuple[Optional[str], bool]  # (text, or EOD; trained)


@dataclass(frozen=True)
class SFTRecord:
    format: str  # PROMPT_RESPONSE or MESSAGES
    pieces: tuple[Piece, ...]
    where: str  # file:line

    def texts(self) -> list[str]:
        """The pieces the tokenizer encodes (EOD pieces are added as ids)."""
        return [text for text, _ in self.pieces if text is not EOD]


def _blank(text: str) -> bool:
    return not text or text.isspace()


def _render_messages(messages: Any, where: str) -> Union[SFTRecord, Skip]:
    if not isinstance(messages, list):
        return Skip("missing_field", where, f"field 'messages' is {type(messages).__name__}, not a list of turns")
    pieces: list[Piece] = []
    answered = False
    for i, turn in enumerate(messages):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            missing = "role" if not isinstance(role, str) else "content"
            return Skip("missing_field", where, f"messages[{i}] has no string {missing!r}")
        if role not in ROLES:
            return Skip("unknown_role", where, f"messages[{i}].role is {role!r}; known roles: {', '.join(ROLES)}")
        trained = role == "assistant"
        answered = answered or trained
        pieces += [(ROLE_HEADERS[role], False), (content, trained), (EOD, True) if trained else (TURN_END, False)]
    if not answered:
        return Skip("no_assistant_turn", where, f"none of the {len(messages)} messages has role 'assistant': "
                                                f"nothing to train on")
    return SFTRecord(MESSAGES, tuple(pieces), where)


def render_record(item: JsonObject) -> Union[SFTRecord, Skip]:
    """The pieces of one JSONL record, or why it is skipped (missing_field, empty, unknown_role,
    no_assistant_turn)."""
    obj, where = item.value, item.where
    if "messages" in obj:
        return _render_messages(obj["messages"], where)
    for key in ("prompt", "response"):
        if not isinstance(obj.get(key), str):
            what = f"field {key!r} is {type(obj[key]).__name__}, not a string" if key in obj else f"no field {key!r}"
            return Skip("missing_field", where, f"{what} (an SFT record has prompt and response, or messages)")
        if _blank(obj[key]):
            return Skip("empty", where, f"field {key!r} is empty")
    return SFTRecord(PROMPT_RESPONSE, ((obj["prompt"], False), (obj["response"], True), (EOD, True)), where)


Batch = tuple[tuple[np.ndarray, int, list[SFTRecord]], list[str]]


def render_batches(reader: RecordReader, skips: SkipCounter, first_record: int, max_records: int,
                   max_bytes: int) -> Iterator[Batch]:
    """Records rendered and grouped for the encoder workers, as data_prep.pipeline groups documents:
    ((record index of each, input bytes read, the records), the texts of all their pieces in order).
    Records before `first_record` (in shards kept from an earlier run) are rendered only to count skips."""
    records: list[SFTRecord] = []
    indices: list[int] = []
    texts: list[str] = []
    size = mark = 0
    for rec, item in enumerate(reader.records()):
        rendered = item if isinstance(item, Skip) else render_record(item)
        if isinstance(rendered, Skip):
            skips.add(rendered)
            continue
        if rec < first_record:
            continue
        records.append(rendered)
        indices.append(rec)
        pieces = rendered.texts()
        texts += pieces
        size += sum(map(len, pieces))
        if len(records) >= max_records or size >= max_bytes:
            yield (np.asarray(indices, dtype=np.int64), reader.bytes_read - mark, records), texts
            mark = reader.bytes_read
            records, indices, texts, size = [], [], [], 0
    if records:
        yield (np.asarray(indices, dtype=np.int64), reader.bytes_read - mark, records), texts


@dataclass
class FittedBatch:
    """Records of one batch cut/padded to seq_len: tokens and mask back to back, one document each."""
    tokens: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray  # all seq_len
    records: np.ndarray  # input record index of each document
    truncated: list[int] = field(default_factory=list)  # record indices cut after seq_len tokens
    skipped: list[tuple[int, Skip]] = field(default_factory=list)  # prompt_too_long


def fit_record(record: SFTRecord, piece_ids: list[np.ndarray], eod_id: int, seq_len: int,
               dtype: np.dtype) -> Union[tuple[np.ndarray, np.ndarray, bool], Skip]:
    """(tokens, mask, truncated) of exactly seq_len entries for one record, or a prompt_too_long Skip."""
    ids, flags = [], []
    texts = iter(piece_ids)
    for text, trained in record.pieces:
        part = np.asarray([eod_id], dtype=np.int64) if text is EOD else next(texts)
        ids.append(part)
        flags.append(np.full(len(part), trained, LOSS_MASK_DTYPE))
    all_ids, all_mask = np.concatenate(ids), np.concatenate(flags)
    n = min(len(all_ids), seq_len)
    mask = all_mask[:n].copy()
    mask[:1] = 0  # never a target: token 0 is also the last label of the sample before, another record's
    if not mask.any():
        first = int(np.argmax(all_mask)) if all_mask.any() else len(all_ids)
        return Skip("prompt_too_long", record.where,
                    f"{first} tokens come before the first trained one (the prompt): --seq-len {seq_len} "
                    f"leaves no room for the response")
    tokens = np.full(seq_len, eod_id, dtype=dtype)  # padding is the EOD id, masked
    tokens[:n] = all_ids[:n]
    padded_mask = np.zeros(seq_len, LOSS_MASK_DTYPE)
    padded_mask[:n] = mask
    return tokens, padded_mask, len(all_ids) > seq_len


def fit_batch(records: list[SFTRecord], record_indices: np.ndarray, flat: np.ndarray, lengths: np.ndarray,
              eod_id: int, seq_len: int, dtype: np.dtype) -> FittedBatch:
    """Fit every record of a batch; `flat`/`lengths` are the encoded text pieces of all records in order."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    piece = 0
    tokens, masks, kept, truncated, skipped = [], [], [], [], []
    for record, rec in zip(records, record_indices.tolist()):
        count = len(record.texts())
        ids = [flat[offsets[k]:offsets[k + 1]].astype(np.int64) for k in range(piece, piece + count)]
        piece += count
        fitted = fit_record(record, ids, eod_id, seq_len, dtype)
        if isinstance(fitted, Skip):
            skipped.append((rec, fitted))
            continue
        tokens.append(fitted[0])
        masks.append(fitted[1])
        kept.append(rec)
        if fitted[2]:
            truncated.append(rec)
    empty = np.empty(0, dtype=dtype)
    return FittedBatch(np.concatenate(tokens) if tokens else empty,
                       np.concatenate(masks) if masks else np.empty(0, LOSS_MASK_DTYPE),
                       np.full(len(kept), seq_len, dtype=np.int64), np.asarray(kept, dtype=np.int64),
                       truncated, skipped)


def manifest_section(seq_len: int, eod_id: int, eod_token: str) -> dict[str, Any]:
    """What the manifest says about SFT output ("sft"); counts are added when the run ends."""
    return {"layout": LAYOUT, "seq_len": seq_len, "pad_id": eod_id, "eod_id": eod_id, "eod_token": eod_token,
            "template": TEMPLATE,
            "loss_mask": "per shard NAME: NAME.loss_mask.bin/.idx, MMIDIDX uint8, the same document lengths; "
                         "1 = the token is a training target, 0 = prompt, role header or padding",
            "packing": "one record per document of exactly seq_len tokens (padded with pad_id, masked), "
                       "which is one training sample: no record shares a sample with another"}


def open_loss_mask(tokens: Shard) -> Optional[Shard]:
    """The loss mask beside a token shard (None for pre-training data), checked to pair with it."""
    prefix = loss_mask_of(tokens.prefix)
    if prefix is None:
        return None
    mask = Shard(prefix)
    fix = "re-run `megalm-prep tokenize --sft` for this output"
    if mask.dtype != LOSS_MASK_DTYPE:
        raise ShardFormatError(f"{mask.idx_file}: a loss mask holds uint8, this one {mask.dtype}; {fix}")
    if not np.array_equal(mask.sequence_lengths, tokens.sequence_lengths):
        raise ShardFormatError(f"{mask.idx_file}: its document lengths differ from those of {tokens.idx_file}, "
                               f"so the mask does not belong to these tokens; {fix}")
    return mask


def seq_len_problem(prefix: str, seq_len: int) -> Optional[str]:
    """Why shard `prefix` cannot be trained at data.seq_len=seq_len (None for pre-training data and
    for fine-tuning data padded to seq_len)."""
    return None if loss_mask_of(prefix) is None else padded_length_problem(Shard(prefix), seq_len)


def padded_length_problem(tokens: Shard, seq_len: int) -> Optional[str]:
    """Why SFT shard `tokens` cannot give samples of seq_len tokens (None when its documents are all that
    long): one record is one sample only when data.seq_len is the --seq-len it was padded to."""
    lengths = tokens.sequence_lengths
    if len(lengths) and (lengths != seq_len).any():
        found = sorted({int(x) for x in lengths[:1000]})[:3]
        return (f"{tokens.prefix} is fine-tuning data padded to {found[0] if len(found) == 1 else found} tokens "
                f"per record (megalm-prep tokenize --sft --seq-len), but data.seq_len is {seq_len}: set "
                f"data.seq_len to its --seq-len or re-run prep with --seq-len {seq_len}")
    return None
