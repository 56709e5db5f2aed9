"""The Llama-style decoder (`GPTModel`), its pipeline layer specs, parameter naming and FLOP count."""
from .flops import flops_per_token, matmul_parameters
from .gpt import EmbeddingLayer, FinalNorm, GPTModel, OutputLayer, language_model_loss
from .params import hf_llama_name, merge_qkv, split_qkv, tp_partition_dim
from .pipeline import gpt_param_name, pipeline_layer_specs, pipeline_loss_fn, tied_output_forward
from .transformer import MLP, Attention, RMSNorm, TransformerBlock

__all__ = ["MLP", "Attention", "EmbeddingLayer", "FinalNorm", "GPTModel", "OutputLayer", "RMSNorm", "TransformerBlock",
           "flops_per_token", "gpt_param_name", "hf_llama_name", "language_model_loss", "matmul_parameters",
           "merge_qkv", "pipeline_layer_specs", "pipeline_loss_fn", "split_qkv", "tied_output_forward",
           "tp_partition_dim"]
