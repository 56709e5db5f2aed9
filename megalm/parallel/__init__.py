"""Parallelism: the (pp, dp, tp) process grid with DeepSpeed's `mpu`, tensor-parallel layers and their
autograd communication, vocab-parallel cross-entropy, TP-aware RNG and TP-invariant initialisation."""
from .comm import (copy_to_tp_region, gather_along_dim, gather_from_tp_region, reduce_from_tp_region,
                   scatter_to_tp_region)
from .cross_entropy import vocab_parallel_cross_entropy
from .grid import (ModelParallelUnit, ProcessGrid, destroy_process_grid, get_process_grid, grid_rank_lists,
                   initialize_process_grid, is_grid_initialized)
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_logits,
                     vocab_weight_shard)
from .random import get_rng_tracker, model_parallel_seed

__all__ = ["ColumnParallelLinear", "ModelParallelUnit", "ProcessGrid", "RowParallelLinear", "VocabParallelEmbedding",
           "copy_to_tp_region", "destroy_process_grid", "gather_along_dim", "gather_from_tp_region",
           "get_process_grid", "get_rng_tracker", "grid_rank_lists", "initialize_process_grid",
           "is_grid_initialized", "model_parallel_seed", "reduce_from_tp_region", "scatter_to_tp_region",
           "vocab_parallel_cross_entropy", "vocab_parallel_logits", "vocab_weight_shard"]
