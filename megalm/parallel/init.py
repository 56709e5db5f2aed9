"""Sharded, layout-invariant parameter initialisation: each rank draws only the numbers it keeps.

A weight's full tensor [rows, cols] is cut into a fixed grid of tiles; tile (i, j) is drawn from its own
CPU generator seeded by (model seed, the parameter's stable GPTModel name, i, j). The grid depends only
on the model's shape, never on the layout, so the full weight assembled from any layout equals the tp=1
weight for the same seed, bit for bit, and a rank materialises a region by drawing just the tiles that
overlap it:

  * a TP shard draws the tiles of its rows (column-parallel, vocabulary) or columns (row-parallel);
    the tile's extent along the TP dim divides every legal shard (`tp_unit`), so no tile straddles two;
  * a pipeline stage builds only its layers (the names carry the global layer index);
  * under ZeRO-3 a rank fills only its flat partition of the TP shard (`initialise_zero3_partitions`):
    tiles are short along the other dim too, so a contiguous flat range touches few tiles beyond it.

Why tiles and not one generator per parameter (INIT_STREAM 1, before issue 12): a CPU generator
(mt19937) cannot skip ahead, so with one stream per parameter every rank drew the full tensor of each
of its parameters and sliced it; at tp=pp=1 under ZeRO-3 that is every number of the model on every
rank. Tiles of ~64K numbers cost ~4 us of seeding each (~2% of drawing them, measured).
"""
from __future__ import annotations

import functools
import hashlib
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

# Which numbers a seed gives. 1: one generator per parameter's full tensor; 2: per tile (this file).
# Recorded in checkpoint metadata; bump it whenever the numbers drawn for a given seed change.
INIT_STREAM = 2
TILE_ELEMENTS = 1 << 16  # numbers per tile, at most (unless one row/column unit is larger)
BAND_ELEMENTS = 1 << 18  # numbers in one row of tiles across a row-parallel weight, at most


def fp32_cpu_empty(shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised fp32 CPU tensor that deepspeed.zero.Init's constructor patches cannot touch.

    Under bf16/fp16 zero.Init casts whatever `torch.randn/empty/zeros(...)` return to the half dtype,
    even with an explicit `dtype=`; scaling that by std then rounds twice, and ZeRO-3 weights would
    differ from the other layouts' in the last bit. `Tensor.new_empty` is not patched, and an integer
    seed tensor is never cast."""
    return torch.empty(0, dtype=torch.uint8, device="cpu").new_empty(tuple(shape), dtype=torch.float32)


def tile_generator(seed: int, key: str, i: int, j: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, parameter name, tile row i, tile column j)."""
    digest = hashlib.sha256(f"{seed}/{key}/{i},{j}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


@functools.lru_cache(maxsize=None)
def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (at least 1)."""
    best, d = 1, 1
    while d * d <= n:
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= limit:
                    best = c
        d += 1
    return best


def tile_shape(shape: Sequence[int], tp_dim: Optional[int], tp_unit: Optional[int] = None) -> tuple[int, int]:
    """The tile of a [rows, cols] weight split along `tp_dim` (None: not split), given that every legal
    TP shard along that dim is a multiple of `tp_unit` (None: only the whole dim is known to be).

    Split along rows: tiles are whole rows, as many as fit TILE_ELEMENTS and divide tp_unit (a ZeRO
    partition, a flat range, then touches at most two tiles it does not need). Split along columns:
    tiles are tp_unit's largest divisor <= TILE_ELEMENTS wide and short enough that one row of tiles
    across the weight stays within BAND_ELEMENTS (so a flat range again touches little else)."""
    rows, cols = int(shape[0]), int(shape[1])
    if tp_dim == 1:
        width = _largest_divisor(tp_unit or cols, TILE_ELEMENTS)
        return max(1, min(TILE_ELEMENTS // width, BAND_ELEMENTS // cols)), width
    return _largest_divisor(tp_unit or rows, max(1, TILE_ELEMENTS // cols)), cols


def _spans(start: int, stop: int, step: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(tile index, tile start, tile stop) of the tiles of `step` over [0, size) that overlap [start, stop)."""
    for t in range(start // step, -(-stop // step)):
        yield t, t * step, min((t + 1) * step, size)


@dataclass(frozen=True)
class TiledNormal:
    """The full N(0, std^2) tensor of parameter `key`, [rows, cols], as a grid of independently seeded
    tiles of `tile` = (tile rows, tile cols); edge tiles are cut to the tensor."""
    key: str
    seed: int
    std: float
    shape: tuple[int, int]
    tile: tuple[int, int]

    def draw(self, r0: int, r1: int, c0: int, c1: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows [r0, r1) x columns [c0, c1) of the full tensor (fp32, CPU), drawing only the tiles that
        overlap them. `out`: a contiguous fp32 CPU [r1 - r0, c1 - c0] tensor to fill in place.

        A tile is always drawn as one contiguous block of its own shape (the same numbers whichever
        region asked for it); tiles that are whole rows of `out` are drawn straight into it."""
        (rows, cols), (tr, tc) = self.shape, self.tile
        if not (0 <= r0 <= r1 <= rows and 0 <= c0 <= c1 <= cols):
            raise ValueError(f"{self.key}: region [{r0}:{r1}, {c0}:{c1}] is outside its shape {self.shape}")
        out = fp32_cpu_empty((r1 - r0, c1 - c0)) if out is None else out
        whole_rows = c0 == 0 and c1 == cols and tc >= cols
        for i, a, b in _spans(r0, r1, tr, rows):
            for j, c, d in _spans(c0, c1, tc, cols):
                g = tile_generator(self.seed, self.key, i, j)
                if whole_rows and r0 <= a and b <= r1:
                    out[a - r0:b - r0].normal_(generator=g)
                    continue
                tile = fp32_cpu_empty((b - a, d - c)).normal_(generator=g)
                ra, rb, ca, cb = max(a, r0), min(b, r1), max(c, c0), min(d, c1)
                out[ra - r0:rb - r0, ca - c0:cb - c0] = tile[ra - a:rb - a, ca - c:cb - c]
        return out.mul_(self.std)


@dataclass(frozen=True)
class ShardInit:
    """How a parameter's local tensor [rows, cols] is drawn: the block of `normal`'s full tensor at
    `offset` (rows, cols). Local rows past the full tensor's rows are zero (vocabulary padding)."""
    normal: TiledNormal
    shape: tuple[int, int]
    offset: tuple[int, int]

    def rows(self, a: int, b: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Local rows [a, b) as fp32 CPU [b - a, cols] (into `out` when given)."""
        cols = self.shape[1]
        out = fp32_cpu_empty((b - a, cols)) if out is None else out
        r0, c0 = self.offset
        real = max(a, min(b, self.normal.shape[0] - r0))  # local rows below `real` exist in the full tensor
        if real > a:
            self.normal.draw(r0 + a, r0 + real, c0, c0 + cols, out=out[:real - a])
        out[real - a:].zero_()
        return out

    def flat(self, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened local tensor: a ZeRO-3 partition."""
        cols = self.shape[1]
        a, b = start // cols, -(-stop // cols)
        return self.rows(a, b).view(-1)[start - a * cols:stop - a * cols]


def tp_shard_init(key: str, seed: int, std: float, full_shape: Sequence[int], padded_shape: Sequence[int],
                  tp_dim: int, rank: int, world: int, tp_unit: Optional[int] = None) -> ShardInit:
    """TP rank `rank`'s shard of a `padded_shape` weight split into `world` contiguous parts along
    `tp_dim`, whose first `full_shape` rows are drawn (the rest is padding, zero). `tp_unit`: see
    `tile_shape`. Raises if the split dim does not divide."""
    padded = [int(s) for s in padded_shape]
    if padded[tp_dim] % world != 0:
        raise ValueError(f"{key}: dimension {tp_dim} of size {padded[tp_dim]} is not divisible by {world} ranks")
    local = list(padded)
    local[tp_dim] //= world
    offset = [0, 0]
    offset[tp_dim] = rank * local[tp_dim]
    full = (int(full_shape[0]), int(full_shape[1]))
    normal = TiledNormal(key, seed, float(std), full, tile_shape(full, tp_dim, tp_unit))
    return ShardInit(normal, (local[0], local[1]), (offset[0], offset[1]))


# ---------------------------------------------------------------- parameters, and ZeRO-3's partitions
def zero3_deferral_active() -> bool:
    """True inside an active deepspeed.zero.Init whose partitions we can write: there a parameter is
    allocated but not drawn, and `initialise_zero3_partitions` fills each rank's partition once DeepSpeed
    has made it. (zero.Init broadcasts DP rank 0's full tensor and partitions it as each module's
    `__init__` returns, so values written earlier would not survive on the other ranks.) NVMe-offloaded
    partitions are swapped out at creation: those parameters are drawn whole, as before."""
    pp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    ctx = None if pp is None else pp.top_level_context
    if ctx is None or not getattr(ctx, "patched", False):
        return False
    return str(getattr(ctx, "remote_device", "")) != "nvme"


def new_parameter(value: Union[torch.Tensor, ShardInit], partition_dim: Optional[int] = None) -> torch.nn.Parameter:
    """A parameter holding `value` (a tensor, or a ShardInit to draw), tagged with Megatron's TP
    attributes (DeepSpeed's gradient-norm code reads `tensor_model_parallel`; checkpoint consolidation
    reads `partition_dim`).

    Allocated with torch.empty (no device) and then filled, so that under deepspeed.zero.Init the
    parameter lands on the target device/dtype and is partitioned when the owning module's __init__
    returns. A ShardInit there is only recorded (`megalm_pending_init`): see zero3_deferral_active."""
    shape = value.shape if isinstance(value, ShardInit) else tuple(value.shape)
    param = torch.nn.Parameter(torch.empty(tuple(shape)))
    with torch.no_grad():
        if not isinstance(value, ShardInit):
            param.copy_(value)
        elif zero3_deferral_active():
            param.megalm_pending_init = value
        elif param.dtype == torch.float32 and param.device.type == "cpu" and param.is_contiguous():
            value.rows(0, shape[0], out=param.data)
        else:
            param.copy_(value.rows(0, shape[0]))
    param.tensor_model_parallel = partition_dim is not None
    param.partition_dim = partition_dim
    return param


def _partitions(param: torch.nn.Parameter) -> list[tuple[torch.Tensor, int]]:
    """(partition tensor, its start in the flattened parameter) for this rank's ZeRO-3 copies: the
    primary partition over the DP group and, with hpZ (zero_hpz_partition_size > 1), the secondary."""
    import deepspeed.comm as dist

    parts = [(param.ds_tensor, param.ds_tensor.ds_numel * dist.get_rank(group=param.ds_process_group))]
    secondary = getattr(param, "ds_secondary_tensor", None)
    if secondary is not None:
        parts.append((secondary, secondary.ds_numel * dist.get_rank(group=param.ds_zero_param_process_group)))
    return parts


def initialise_zero3_partitions(module: torch.nn.Module) -> int:
    """Fill this rank's ZeRO-3 partition(s) of every parameter of `module` whose init zero.Init deferred,
    drawing only the tiles that overlap them (cast once into the partition's dtype; padding zero).
    Returns how many parameters it filled. GPTModel calls it at the end of its __init__, when every
    submodule has been partitioned; a caller that builds other modules under zero.Init must too."""
    filled = 0
    for name, param in module.named_parameters():
        init = getattr(param, "megalm_pending_init", None)
        if init is None:
            continue
        if getattr(param, "ds_tensor", None) is None:
            raise RuntimeError(f"{name}: its initialisation was deferred to its ZeRO-3 partition, but zero.Init "
                               f"has not partitioned it; call initialise_zero3_partitions after the module's "
                               f"__init__ returns, inside the same zero.Init")
        with torch.no_grad():
            for part, start in _partitions(param):
                n = max(0, min(param.ds_numel - start, part.ds_numel))
                if n:
                    part.narrow(0, 0, n).copy_(init.flat(start, start + n))
                part.narrow(0, n, part.numel() - n).zero_()
        del param.megalm_pending_init
        filled += 1
    return filled
