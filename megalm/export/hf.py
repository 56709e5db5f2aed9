"""`megalm-export`: a checkpoint (any layout) -> a Hugging Face `LlamaForCausalLM` directory.

    megalm-export --checkpoint RUN_DIR [--step N] --output DIR [--dtype float32|bfloat16|float16]
                  [--max-shard-size 5GB] [--tokenizer PATH] [--overwrite]

Writes config.json, model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json
when larger than --max-shard-size), generation_config.json and, when the run has one, the tokenizer
(tokenizer.json + tokenizer_config.json for `PreTrainedTokenizerFast`). Names follow
`megalm.model.params`: the fused qkv is split into q/k/v_proj (`split_qkv`), the vocabulary is the
real one (TP padding stripped), and with tied embeddings only model.embed_tokens.weight is written
(HF ties lm_head to it). Our decoder uses HF's conventions (rotate-half RoPE, kv head j // group,
fp32 RMSNorm), so no weight needs permuting.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Optional

import torch
from megalm.config.model import ModelConfig
from megalm.model.params import hf_llama_name, split_qkv

from .checkpoint_files import CheckpointError, locate_checkpoint
from .full_weights import expected_shapes
from .safetensors_out import TensorSpec, write_safetensors_stream
from .shard_reader import ShardReader

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QKV = re.compile(r"layers\.(\d+)\.attention\.qkv\.weight")


def hf_config(cfg: ModelConfig, dtype: str = "float32", bos_id: Optional[int] = None,
              eos_id: Optional[int] = None) -> dict:
    """config.json for LlamaForCausalLM with this shape (`rope_theta` at top level: read by
    transformers 4.x and converted to `rope_parameters` by 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def hf_tensors(name: str, full: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """One full GPTModel weight -> its LlamaForCausalLM tensors (the fused qkv becomes q/k/v_proj)."""
    m = QKV.fullmatch(name)
    if m:
        return [(f"model.layers.{m.group(1)}.self_attn.{proj}_proj.weight", part.to(dtype).contiguous())
                for proj, part in zip("qkv", split_qkv(full, cfg))]
    return [(hf_llama_name(name), full.to(dtype).contiguous())]


def hf_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """Full weights (in memory) -> LlamaForCausalLM tensors (contiguous, `dtype`)."""
    return dict(pair for name, t in weights.items() for pair in hf_tensors(name, t, cfg, dtype))


def hf_specs(cfg: ModelConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """Name, shape and dtype of every LlamaForCausalLM tensor of `cfg`, in the order `hf_tensors` yields them
    over GPTModel order: known before any tensor is read, so the safetensors headers are written first."""
    specs = []
    for name, shape in expected_shapes(cfg).items():
        if QKV.fullmatch(name):
            meta = torch.empty(shape, device="meta")
            specs += [TensorSpec(hf, tuple(t.shape), dtype) for hf, t in hf_tensors(name, meta, cfg, dtype)]
        else:
            specs.append(TensorSpec(hf_llama_name(name), shape, dtype))
    return specs


def stream_hf_tensors(reader: ShardReader, dtype: torch.dtype):
    """(HF name, tensor) for the whole checkpoint, one GPTModel parameter at a time; the reader's file maps
    are dropped after each, so resident memory holds one parameter (and its converted copy)."""
    for name in reader.names:
        full = reader.full(name)
        pairs = hf_tensors(name, full, reader.cfg, dtype)
        del full
        yield from pairs
        del pairs
        reader.close()


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size: {text!r} is not a size like 5GB, 500MB or 1000000")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def write_tokenizer(tokenizer_path: str, out_dir: str, max_len: int) -> tuple[Optional[int], Optional[int]]:
    """Copy tokenizer.json and describe it for PreTrainedTokenizerFast; returns (bos, eos) ids."""
    from data_prep.errors import PrepError
    from data_prep.tokenizer import EOD_TOKEN, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_path)
    except PrepError as e:
        raise CheckpointError(f"{e} (the run's data.tokenizer; pass --tokenizer PATH if it moved)") from None
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
    eod = tok.token_id(EOD_TOKEN)
    special = {k: EOD_TOKEN for k in ("bos_token", "eos_token", "unk_token")} if eod is not None else {}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                   "clean_up_tokenization_spaces": False, **special}, f, indent=2)
    return eod, eod


class ExportError(ValueError):
    """The output directory cannot be written as asked (it exists, or is not a directory)."""


def _move_into_place(tmp: str, output: str) -> None:
    """Rename the finished `tmp` to `output`. An existing output (--overwrite) is first renamed aside and
    deleted last, so at every instant `output` is the old export, the new one, or (between two renames)
    absent with the old one intact under `OUT.old-<pid>`: never a mix of the two."""
    if not os.path.lexists(output):
        os.rename(tmp, output)
        return
    aside = f"{output}.old-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(output, aside)
    os.rename(tmp, output)
    shutil.rmtree(aside, ignore_errors=True)


def export_hf(run_dir: str, output: str, step: Optional[int] = None, dtype: str = "float32",
              max_shard_size: str = "5GB", tokenizer: Optional[str] = None, overwrite: bool = False) -> list[str]:
    """Export one checkpoint; returns the files written. Everything is written into `OUT.tmp-<pid>` and
    renamed to `output` only when complete (a failed tokenizer check used to leave a directory holding
    just model.safetensors, which loads as a model without a tokenizer); on failure it is removed."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    output = output.rstrip(os.sep) or os.sep
    if os.path.lexists(output):
        if not os.path.isdir(output) or os.path.islink(output):
            raise ExportError(f"--output {output} exists and is not a directory: remove it or choose another path")
        if not overwrite:
            raise ExportError(f"--output {output} already exists: pass --overwrite to replace it, or choose "
                              f"another directory")
    ref = locate_checkpoint(run_dir, step)
    reader = ShardReader(ref)
    cfg = reader.cfg
    tmp = f"{output}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # our own pid's leftover: a dead export, never a live one
    os.makedirs(tmp)
    try:
        files = write_safetensors_stream(tmp, hf_specs(cfg, DTYPES[dtype]), stream_hf_tensors(reader, DTYPES[dtype]),
                                         max_bytes)
        tok_path = tokenizer or ref.run_config().data.tokenizer
        bos = eos = None
        if tok_path:
            bos, eos = write_tokenizer(tok_path, tmp, cfg.max_seq_len)
            files += ["tokenizer.json", "tokenizer_config.json"]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg, dtype, bos, eos), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": bos, "eos_token_id": eos}, f, indent=2)
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ["config.json", "generation_config.json"] + files


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN_DIR (or RUN_DIR/checkpoints/step_N)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--output", required=True, help="directory for the Hugging Face model")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's data.tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    args = p.parse_args(argv)
    try:
        files = export_hf(args.checkpoint, args.output, args.step, args.dtype, args.max_shard_size, args.tokenizer,
                          args.overwrite)
    except (CheckpointError, ValueError) as e:
        print(f"megalm-export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
