"""Token generation from a GPTModel: with a KV cache (the default) or by re-running the context (the reference).

    generate_batch(model, [[5, 6, 7], [9]], max_new_tokens=32)                   # greedy, KV cache
    generate_batch(model, prompts, 32, temperature=0.8, top_k=40, seed=1)        # sampling
    generate_batch(model, prompts, 32, kv_cache=False)                           # the old path

With the cache, the prompts are left-padded into one batch and prefilled in one forward; then each step
feeds one token per row (`megalm.model.kv_cache`: padding masked out, RoPE positions counted per row,
so a row generates exactly what it would alone). Without it, each row runs alone and every step
re-runs the row's whole context. Both cut a context to its last max_seq_len tokens; once a row's
context would pass max_seq_len the window slides and every position shifts, so the cached path
finishes such rows the uncached way (exactly, at the uncached speed). Row r samples from its own CPU
generator seeded `seed + r`, so both paths draw the same tokens and row 0 of a batch is the prompt
alone. Under TP every rank runs this with its shard: logits are all-gathered over the TP group
(`full_vocab`), so all ranks pick the same tokens.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megalm.model.kv_cache import KVCache
from megalm.parallel.comm import gather_along_dim

# stop_when(row, its new ids so far) -> True to stop that row
StopRule = Callable[[int, list[int]], bool]


def full_vocab(model: torch.nn.Module, logits_shard: torch.Tensor) -> torch.Tensor:
    """A TP rank's vocabulary shard of logits -> logits over the real vocabulary (fp32): the shards
    all-gathered in rank order (so every TP rank holds the same numbers), vocabulary padding dropped."""
    logits = gather_along_dim(logits_shard, -1, getattr(model, "tp_group", None))
    return logits[..., : model.cfg.vocab_size].float()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top-p; the rest -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class _Picker:
    """Chooses each row's next token: argmax at temperature 0, else a draw from that row's generator."""

    def __init__(self, rows: int, temperature: float, top_k: int, top_p: float, seed: int):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generators = [torch.Generator(device="cpu").manual_seed(seed + r) for r in range(rows)]

    def __call__(self, rows: list[int], logits: torch.Tensor) -> list[int]:
        """`logits` [len(rows), vocab] (fp32) -> one token id per row."""
        if self.temperature <= 0:
            return logits.argmax(-1).tolist()
        out = []
        for i, r in enumerate(rows):
            probs = filter_logits(logits[i].cpu() / self.temperature, self.top_k, self.top_p).softmax(-1)
            out.append(int(torch.multinomial(probs, 1, generator=self.generators[r])))
        return out


def _finished(token: int, row: int, new: list[int], stop_id: Optional[int], stop_when: Optional[StopRule]) -> bool:
    return (stop_id is not None and token == stop_id) or (stop_when is not None and stop_when(row, new))


def _generate_uncached(model: torch.nn.Module, row: int, ids: list[int], new: list[int], steps: int, pick: _Picker,
                       stop_id: Optional[int], stop_when: Optional[StopRule]) -> None:
    """Append up to `steps` tokens to `new` (and `ids`), re-running the last max_seq_len ids each step."""
    device = next(model.parameters()).device
    for _ in range(steps):
        context = torch.tensor([ids[-model.cfg.max_seq_len:]], dtype=torch.long, device=device)
        token = pick([row], full_vocab(model, model(context)[:, -1]))[0]
        ids.append(token)
        new.append(token)
        if _finished(token, row, new, stop_id, stop_when):
            return


def _generate_cached(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, pick: _Picker,
                     stop_id: Optional[int], stop_when: Optional[StopRule]) -> list[list[int]]:
    max_len = model.cfg.max_seq_len
    prompts = [p[-max_len:] for p in prompts]
    width = max(len(p) for p in prompts)
    # token t of a row is predicted from len(prompt) + t tokens: the cache serves while that fits max_seq_len
    cached_steps = min(max_new_tokens, max_len - width + 1)
    device = next(model.parameters()).device
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
    cache = KVCache.for_model(model, len(prompts), width + cached_steps - 1)
    new: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    logits = model(ids, cache=cache, valid=valid)[:, -1]  # prefill: every prompt in one forward
    for step in range(cached_steps):
        if step:
            logits = model(torch.tensor(fed, dtype=torch.long, device=device)[:, None], cache=cache)[:, -1]
        logits = full_vocab(model, logits)
        if len(live) < len(prompts):  # (indexing copies the logits: only once some row has finished)
            logits = logits[torch.tensor(live, device=device)]
        fed = [0] * len(prompts)  # a finished row is fed a dummy token: its output is complete
        still = []
        for r, token in zip(live, pick(live, logits)):
            fed[r] = token
            new[r].append(token)
            if not _finished(token, r, new[r], stop_id, stop_when):
                still.append(r)
        live = still
        if not live:
            return new
    del cache
    for r in live:  # past max_seq_len: the window slides, so positions shift and the cache no longer applies
        _generate_uncached(model, r, prompts[r] + new[r], new[r], max_new_tokens - cached_steps, pick, stop_id, stop_when)
    return new


@torch.inference_mode()  # not just no_grad: no version counters or view tracking, ~10% of a decode step
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_id: Optional[int] = None,
                   kv_cache: bool = True, stop_when: Optional[StopRule] = None) -> list[list[int]]:
    """Each prompt's new ids (greedy when temperature == 0). A row ends after max_new_tokens, after
    `stop_id` (which is kept) or once `stop_when(row, new ids)` is true."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("a prompt is empty: give at least one token per prompt")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    pick = _Picker(len(prompts), temperature, top_k, top_p, seed)
    if kv_cache:
        return _generate_cached(model, prompts, max_new_tokens, pick, stop_id, stop_when)
    new: list[list[int]] = [[] for _ in prompts]
    for r, prompt in enumerate(prompts):
        _generate_uncached(model, r, list(prompt), new[r], max_new_tokens, pick, stop_id, stop_when)
    return new


def generate_ids(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_id: Optional[int] = None,
                 kv_cache: bool = True) -> list[int]:
    """One prompt's new ids: `generate_batch` with a batch of one."""
    return generate_batch(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, stop_id, kv_cache)[0]
