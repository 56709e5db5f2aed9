"""KVCache: the keys and values of every token a GPTModel has seen, so generation runs each token once.

    cache = KVCache.for_model(model, batch=2, max_len=prompt_len + max_new_tokens)
    logits = model(prompt_ids, cache=cache, valid=prompt_valid)   # prefill: the whole prompt, one forward
    logits = model(next_ids[:, None], cache=cache)                 # then one token per step

Per layer, k and v are [batch, local_kv_heads, max_len, head_dim], preallocated; slot t holds the t-th
token fed to the model. Under TP each rank caches only its own kv heads (attention is head-parallel), so
nothing extra is communicated. `valid` [batch, slots] is False on left padding: a row's padded slots
are never attended to and do not count towards its positions, so a row's RoPE position is the number
of real tokens before it, exactly as if the row were run alone (and as HF's `position_ids =
attention_mask.cumsum(-1) - 1`). A padded slot attends to itself only, so its (unused) output stays
finite. One forward (`GPTModel.forward(ids, cache=...)`) = `begin` (the new slots' positions and mask),
each layer's `rotary` and `update`, `commit`. Until a padded slot appears the positions are the slot
numbers and a one-token step attends to every slot, with no mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .transformer import rotary_cos_sin


class KVCache:
    """Preallocated per-layer keys/values, which slots hold real tokens, and the forward in progress."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.batch, self.max_len = batch, max_len
        self.length = 0  # slots filled by committed forwards
        self.padded = False  # some slot so far is padding (then positions and masks are per row)
        self._end = 0  # slots filled once the forward in progress commits
        self.positions: Optional[torch.Tensor] = None  # [batch, new] RoPE positions of the new tokens; None: slots
        self.mask: Optional[torch.Tensor] = None  # [batch or 1, 1, new, _end] True = may attend; None: all
        self._rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._table: Optional[tuple[tuple[int, float], torch.Tensor, torch.Tensor]] = None  # cos/sin per slot

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int) -> "KVCache":
        """An empty cache shaped for `model` (a GPTModel; under TP, this rank's kv heads)."""
        attn = model.layers[0].attention
        weight = attn.qkv.weight
        return cls(len(model.layers), batch, attn.local_kv_heads, attn.head_dim, max_len, weight.device, weight.dtype)

    def begin(self, batch: int, new: int, valid: Optional[torch.Tensor] = None) -> None:
        """Start a forward over `new` tokens in each of `batch` rows; `valid` [batch, new] is False on
        padding (None: no padding)."""
        start, end = self.length, self.length + new
        if batch != self.batch:
            raise ValueError(f"the KV cache was built for batch {self.batch}; this forward has {batch} rows")
        if valid is not None and tuple(valid.shape) != (batch, new):
            raise ValueError(f"valid has shape {tuple(valid.shape)}; expected the input ids' ({batch}, {new})")
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens per row and {end} are needed: build it with "
                             f"a larger max_len (prompt length + max new tokens)")
        self.valid[:, start:end] = True if valid is None else valid
        self.padded = self.padded or (valid is not None and not bool(valid.all()))
        self._end = end
        if not self.padded:
            # positions are the slot numbers (rotary slices its table); a single new token may attend to
            # every slot, so the per-token decode step builds no tensor here at all
            self.positions = None
            self.mask = None if new == 1 else self._causal(start, end)[None, None]
            return
        seen = self.valid[:, :end]
        self.positions = (seen.cumsum(-1)[:, start:end] - 1).clamp(min=0)
        key = torch.arange(end, device=self.valid.device)[None, :]
        self.mask = ((self._causal(start, end) & seen[:, None, :]) | (key == key[:, start:end].T))[:, None]

    def _causal(self, start: int, end: int) -> torch.Tensor:
        """[new, end]: slot start + i may attend to slots 0..start + i."""
        device = self.valid.device
        return torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]

    def rotary(self, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [batch or 1, 1, new, head_dim] at the new tokens' positions (looked up once per forward in a
        table of every slot's position, built on first use, and shared by the layers)."""
        if self._rotary is None:
            if self._table is None or self._table[0] != (head_dim, theta):
                # positions never exceed slot numbers (< max_len): one table serves every forward, instead
                # of recomputing cos/sin (about ten small ops) per decode step
                slots = torch.arange(self.max_len, device=self.valid.device)
                self._table = ((head_dim, theta), *rotary_cos_sin(slots, head_dim, theta))
            _, cos, sin = self._table
            if self.positions is None:  # unpadded: the new tokens' positions are slots length.._end
                self._rotary = cos[None, None, self.length:self._end], sin[None, None, self.length:self._end]
            else:
                self._rotary = cos[self.positions][:, None], sin[self.positions][:, None]
        return self._rotary

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s new k/v [batch, kv_heads, new, head_dim]; return all of its k/v so far."""
        # written in place into the preallocated buffers (narrow + copy_: no per-step allocation or cat)
        start, new = self.length, self._end - self.length
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, start, new).copy_(k)
        values.narrow(2, start, new).copy_(v)
        return keys.narrow(2, 0, self._end), values.narrow(2, 0, self._end)

    def commit(self) -> None:
        """End the forward: its tokens are now part of the context."""
        self.length = self._end
        self.positions = self.mask = self._rotary = None
