"""The canonical "full weights" form of a model, and converting it to and from tensor-parallel shards.

Full weights: a dict keyed by GPTModel parameter names (`megalm.model.params`) holding the whole,
unsplit tensors, with the vocabulary at its real size (`vocab_size` rows, no TP padding). It does
not depend on any layout, so every reader (eval, export, reshard) goes through it:

    checkpoint at (tp, pp, dp, zero) --consolidate--> full weights --shard_for_tp--> any other tp

Padding rows are zero and never used (ids < vocab_size, padded logits are -inf), so stripping them and
re-padding with zeros for another tp loses nothing. Optimizer moments use the same functions: a
moment has the shape of its parameter and is split the same way.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from megalm.config.model import ModelConfig
from megalm.model.params import tp_partition_dim
from megalm.rundir import META_FILE

from .checkpoint_files import CheckpointError

VOCAB_PARAMS = ("embedding.weight", "output.weight")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full (tp=1, unpadded) shape of every GPTModel parameter of `cfg`, in GPTModel order."""
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        shapes.update({
            f"{p}.attention_norm.weight": (h,),
            f"{p}.attention.qkv.weight": ((cfg.num_heads + 2 * cfg.kv_heads) * hd, h),
            f"{p}.attention.o_proj.weight": (h, cfg.num_heads * hd),
            f"{p}.mlp_norm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (f, h),
            f"{p}.mlp.up_proj.weight": (f, h),
            f"{p}.mlp.down_proj.weight": (h, f),
        })
    shapes["final_norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, h)
    return shapes


def check_full_weights(weights: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str,
                       origin: Optional[Mapping[str, str]] = None) -> None:
    """Raise a CheckpointError listing every missing, unexpected or mis-shaped tensor. `origin` maps a
    name to the file it came from, so the message can name the file."""
    want = expected_shapes(cfg)
    problems = []
    for name in want:
        if name not in weights:
            problems.append(f"{name}: missing")
    for name, t in weights.items():
        if name not in want:
            problems.append(f"{name}: not a parameter of this model"
                            + (f" (from {origin[name]})" if origin and name in origin else ""))
        elif tuple(t.shape) != want[name]:
            problems.append(f"{name}: shape {tuple(t.shape)} but the model needs {want[name]}"
                            + (f" (from {origin[name]})" if origin and name in origin else ""))
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointError(
            f"{where}: the weights do not fit the model shape (hidden_size={cfg.hidden_size}, "
            f"num_layers={cfg.num_layers}, num_heads={cfg.num_heads}, num_kv_heads={cfg.kv_heads}, "
            f"ffn={cfg.ffn_size}, vocab_size={cfg.vocab_size}, tie_embeddings={cfg.tie_embeddings}):\n  {shown}\n"
            f"The checkpoint was saved by another model than the one it is loaded into; use the run's own "
            f"model config (its {META_FILE}) or a checkpoint of this model.")


def merge_tp(name: str, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Full tensor from the TP shards of `name` (rank order); vocabulary padding rows stripped."""
    dim = tp_partition_dim(name)
    full = shards[0] if dim is None or len(shards) == 1 else torch.cat(shards, dim=dim)  # tp=1: no copy
    if name in VOCAB_PARAMS:
        full = full[: cfg.vocab_size]
    return full.contiguous()


def shard_for_tp(name: str, full: torch.Tensor, cfg: ModelConfig, tp: int, rank: int,
                 copy: bool = True) -> torch.Tensor:
    """This TP rank's slice of a full tensor (vocabulary padded with zero rows to tp*128 first). A new
    tensor, unless `copy=False` and the slice is `full` itself (tp=1, no padding rows): a reader that
    only copies it on saves one tensor's worth of memory."""
    dim = tp_partition_dim(name)
    if name in VOCAB_PARAMS:  # only this rank's rows are built: no padded copy of the whole table
        rows = cfg.padded_vocab_size(tp) // tp
        if not copy and tp == 1 and rows == full.shape[0]:
            return full
        start = rank * rows
        out = full.new_zeros((rows,) + tuple(full.shape[1:]))
        real = max(0, min(rows, full.shape[0] - start))
        out[:real] = full[start:start + real]
        return out
    if dim is None or tp == 1:
        return full.clone() if copy else full
    if full.shape[dim] % tp != 0:
        raise CheckpointError(f"{name}: dim {dim} of size {full.shape[dim]} cannot be split over tp={tp}")
    return full.chunk(tp, dim=dim)[rank].clone()


def tp_state_dict(weights: Mapping[str, torch.Tensor], cfg: ModelConfig, tp: int = 1, rank: int = 0) -> dict:
    """A GPTModel state dict for TP rank `rank` of `tp` (tp=1: the single-process model)."""
    return {name: shard_for_tp(name, t, cfg, tp, rank) for name, t in weights.items()}


def load_full_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], cfg: ModelConfig,
                      tp: int = 1, rank: int = 0, where: str = "weights") -> None:
    """Copy full weights into a GPTModel built for (tp, rank), checking the model shape first."""
    check_full_weights(weights, cfg, where)
    model_cfg = getattr(model, "cfg", None)
    if model_cfg is not None and model_cfg != cfg:
        check_full_weights(weights, model_cfg, where)  # names the parameters that do not fit
    missing, unexpected = model.load_state_dict(tp_state_dict(weights, cfg, tp, rank), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{where}: the model has parameters {missing} that the weights lack, "
                              f"and the weights have {unexpected} that the model lacks")
