"""The Llama-style decoder (`GPTModel`), its KV cache for generation, pipeline layer specs, parameter naming
and FLOP count."""
from .flops import flops_per_token, matmul_parameters
from .gpt import EmbeddingLayer, FinalNorm, GPTModel, OutputLayer, language_model_loss
from .kv_cache import KVCache
from .params import hf_llama_name, merge_qkv, parameter_kind, split_qkv, tp_partition_dim
from .pipeline import (gpt_param_name, gpt_parameter_names, pipeline_layer_specs, pipeline_loss_fn,
                       pipeline_to_gpt_name, tied_output_forward)
from .transformer import MLP, Attention, RMSNorm, TransformerBlock

__all__ = ["MLP", "Attention", "EmbeddingLayer", "FinalNorm", "GPTModel", "KVCache", "OutputLayer", "RMSNorm",
           "TransformerBlock", "flops_per_token", "gpt_param_name", "gpt_parameter_names", "hf_llama_name", "language_model_loss",
           "matmul_parameters", "merge_qkv", "parameter_kind", "pipeline_layer_specs", "pipeline_loss_fn",
           "pipeline_to_gpt_name", "split_qkv", "tied_output_forward", "tp_partition_dim"]
