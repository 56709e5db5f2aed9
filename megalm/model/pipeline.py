"""The pipeline seam: GPTModel as a flat list of DeepSpeed LayerSpecs for `PipelineModule`.

    index 0          EmbeddingLayer      input_ids [b, s]   -> hidden [b, s, h]
    index 1 .. L     TransformerBlock i  hidden             -> hidden        (i = index - 1)
    index L + 1      FinalNorm           hidden             -> hidden
    index L + 2      OutputLayer         hidden             -> logits shard [b, s, padded_vocab/tp]
                     (tied: TiedLayerSpec "embed" on EmbeddingLayer, forward_fn=tied_output_forward)

Every layer takes and returns one tensor; the last stage's output goes to `pipeline_loss_fn`.
Building the specs in order (`spec.build()`) gives GPTModel exactly: the same modules and, since
init is keyed by global parameter name, the same weights on whichever stage a layer lands.
This module does not touch the pipeline engine; `megalm.training` wraps the specs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megalm.config.model import ModelConfig
from megalm.parallel.comm import group_size
from megalm.parallel.grid import ProcessGrid, get_process_grid, is_grid_initialized

from .gpt import EmbeddingLayer, FinalNorm, OutputLayer, language_model_loss, resolve_tp_group
from .transformer import TransformerBlock

TIED_EMBEDDING_KEY = "embed"
# The attribute under which megalm.training.stage_engine.StageModule holds a stage's PipelineModule, so
# the per-stage engines (pp > 1, ZeRO-2/3) save PipelineModule names with this prefix.
STAGE_MODULE_ATTR = "pipe"


def tied_output_forward(embedding: EmbeddingLayer, hidden: torch.Tensor) -> torch.Tensor:
    """`forward_fn` of the tied head: the embedding module projects hidden states onto the vocabulary."""
    return embedding(hidden, logits=True)


def pipeline_layer_specs(cfg: ModelConfig, grid: Optional[ProcessGrid] = None) -> list:
    """LayerSpecs for `deepspeed.pipe.PipelineModule(layers=...)`. `grid=None`: the current process
    grid (its TP group and pipeline size), else no parallelism."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # deferred: deepspeed is slow to import

    if grid is None and is_grid_initialized():
        grid = get_process_grid()
    tp_group = resolve_tp_group(grid)
    cfg.validate("model")
    cfg.check_layout(group_size(tp_group), grid.pp if grid is not None else 1, "model")

    specs: list = []
    if cfg.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingLayer, cfg, tp_group=tp_group, tied_weight_attr="weight"))
    else:
        specs.append(LayerSpec(EmbeddingLayer, cfg, tp_group=tp_group))
    specs += [LayerSpec(TransformerBlock, cfg, i, tp_group=tp_group) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(FinalNorm, cfg))
    if cfg.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingLayer, cfg, tp_group=tp_group,
                                   forward_fn=tied_output_forward, tied_weight_attr="weight"))
    else:
        specs.append(LayerSpec(OutputLayer, cfg, tp_group=tp_group))
    return specs


def pipeline_loss_fn(logits: torch.Tensor, labels: torch.Tensor,
                     targets_per_micro_batch: Optional[float] = None) -> torch.Tensor:
    """`PipelineModule(loss_fn=...)`: GPTModel.loss, over the current grid's TP group."""
    return language_model_loss(logits, labels, resolve_tp_group(None), targets_per_micro_batch)


def gpt_param_name(layer_index: int | str, local_name: str, cfg: ModelConfig) -> str:
    """GPTModel name of a PipelineModule parameter: layer `layer_index` (or "tied_modules.embed" /
    the tied key) plus the name inside that layer, e.g. (3, "attention.qkv.weight") ->
    "layers.2.attention.qkv.weight"."""
    if str(layer_index) in (TIED_EMBEDDING_KEY, f"tied_modules.{TIED_EMBEDDING_KEY}"):
        return f"embedding.{local_name}"
    i, L = int(layer_index), cfg.num_layers
    if i == 0:
        return f"embedding.{local_name}"
    if 1 <= i <= L:
        return f"layers.{i - 1}.{local_name}"
    if i == L + 1:
        return f"final_norm.{local_name}"
    if i == L + 2:
        return f"embedding.{local_name}" if cfg.tie_embeddings else f"output.{local_name}"
    raise IndexError(f"pipeline layer {i} does not exist: the model has {L + 3} layers (0..{L + 2})")


def pipeline_to_gpt_name(name: str, cfg: ModelConfig) -> str:
    """A PipelineModule parameter name as DeepSpeed saves it ("3.attention.qkv.weight",
    "tied_modules.embed.weight"; a per-stage engine's "pipe.3.attention.qkv.weight") -> its GPTModel name."""
    if name.startswith(STAGE_MODULE_ATTR + "."):
        name = name[len(STAGE_MODULE_ATTR) + 1:]
    if name.startswith("tied_modules."):
        _, key, local = name.split(".", 2)
        return gpt_param_name(key, local, cfg)
    idx, local = name.split(".", 1)
    return gpt_param_name(int(idx), local, cfg)


def _layer_prefix(layer: nn.Module) -> Optional[str]:
    """GPTModel name prefix of one of the four pipeline layer kinds (None for any other module)."""
    if isinstance(layer, EmbeddingLayer):
        return "embedding"
    if isinstance(layer, TransformerBlock):
        return f"layers.{layer.layer_idx}"
    if isinstance(layer, FinalNorm):
        return "final_norm"
    if isinstance(layer, OutputLayer):
        return "output"
    return None


def gpt_parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> GPTModel name for every parameter of a GPTModel, a PipelineModule stage (any
    subset of layers, tied embedding under `tied_modules`) or any container of pipeline layers.

    Found through the layers themselves (each knows its place: a block its global `layer_idx`), so a
    stage needs neither the ModelConfig nor DeepSpeed's index naming; on GPTModel it reproduces
    `named_parameters()` exactly. Name-based rules (weight decay, `megalm.model.params`) apply to live
    modules through this and to checkpoint files through `pipeline_to_gpt_name`."""
    names: dict[int, str] = {}
    for module in model.modules():
        prefix = _layer_prefix(module)
        if prefix is not None:
            for local, p in module.named_parameters():
                names.setdefault(id(p), f"{prefix}.{local}")
    unnamed = [n for n, p in model.named_parameters() if id(p) not in names]
    if unnamed:
        raise ValueError(f"parameters {unnamed[:5]} are not inside an EmbeddingLayer, TransformerBlock, FinalNorm "
                         f"or OutputLayer, so they have no GPTModel name; add their layer kind to "
                         f"megalm.model.pipeline._layer_prefix and megalm.model.params")
    return names
