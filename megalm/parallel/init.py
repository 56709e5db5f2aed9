"""TP- and PP-invariant parameter initialisation.

Every parameter's *full* tensor is drawn from its own CPU generator, seeded from (model seed, the
parameter's stable name, e.g. "layers.3.attention.qkv.weight"); a rank then keeps its shard. So the
weights do not depend on how the model is split: the full weight assembled from tp=k shards equals
the tp=1 weight, and a pipeline stage that builds only layers 4..7 gets the same layer-4 weights as the
full model. Seeding per parameter (not one stream for the model) is what makes building a subset
possible. Cost: each rank draws the full tensor of each of its parameters once at construction.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch


def param_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, key)."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def fp32_cpu_empty(shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised fp32 CPU tensor that deepspeed.zero.Init's constructor patches cannot touch.

    Under bf16/fp16 zero.Init casts whatever `torch.randn/empty/zeros(...)` return to the half dtype,
    even with an explicit `dtype=`; scaling that by std then rounds twice, and ZeRO-3 weights would
    differ from the other layouts' in the last bit. `Tensor.new_empty` is not patched, and an integer
    seed tensor is never cast."""
    return torch.empty(0, dtype=torch.uint8, device="cpu").new_empty(tuple(shape), dtype=torch.float32)


def full_normal(shape: Sequence[int], std: float, seed: int, key: str) -> torch.Tensor:
    """The full fp32 N(0, std^2) tensor for parameter `key`, on CPU in fp32 under any zero.Init.
    (`normal_` on an empty tensor is what `torch.randn` does: the same numbers, bit for bit.)"""
    g = param_generator(seed, key)
    return fp32_cpu_empty(shape).normal_(generator=g).mul_(std)


def shard(full: torch.Tensor, dim: Optional[int], rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous 1/world slice of `full` along `dim` (`dim=None`: not partitioned)."""
    if dim is None or world == 1:
        return full
    if full.shape[dim] % world != 0:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} is not divisible by {world} ranks")
    return full.chunk(world, dim=dim)[rank].contiguous()


def new_parameter(shard_value: torch.Tensor, partition_dim: Optional[int] = None) -> torch.nn.Parameter:
    """A parameter holding `shard_value`, tagged with Megatron's TP attributes (DeepSpeed's gradient-norm
    code reads `tensor_model_parallel`; checkpoint consolidation reads `partition_dim`).

    Allocated with torch.empty (no device) and then filled, so that under deepspeed.zero.Init the
    parameter lands on the target device/dtype and is partitioned when the owning module's __init__
    returns."""
    param = torch.nn.Parameter(torch.empty(tuple(shard_value.shape)))
    with torch.no_grad():
        param.copy_(shard_value)
    param.tensor_model_parallel = partition_dim is not None
    param.partition_dim = partition_dim
    return param
