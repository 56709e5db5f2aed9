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
from safetensors.torch import save_file

from megalm.config.model import ModelConfig
from megalm.model.params import hf_llama_name, split_qkv

from .checkpoint_files import CheckpointError, locate_checkpoint
from .consolidate import consolidate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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


def hf_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """Full weights -> LlamaForCausalLM tensors (contiguous, `dtype`)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        m = re.fullmatch(r"layers\.(\d+)\.attention\.qkv\.weight", name)
        if m:
            for proj, part in zip("qkv", split_qkv(t, cfg)):
                out[f"model.layers.{m.group(1)}.self_attn.{proj}_proj.weight"] = part
        else:
            out[hf_llama_name(name)] = t
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size: {text!r} is not a size like 5GB, 500MB or 1000000")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def save_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    """One model.safetensors, or shards + index json (HF's naming) when the total exceeds the limit."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX_FILE]


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
    state = consolidate(ref)
    tmp = f"{output}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # our own pid's leftover: a dead export, never a live one
    os.makedirs(tmp)
    try:
        files = save_safetensors(hf_state_dict(state.weights, state.cfg, DTYPES[dtype]), tmp, max_bytes)
        tok_path = tokenizer or ref.run_config().data.tokenizer
        bos = eos = None
        if tok_path:
            bos, eos = write_tokenizer(tok_path, tmp, state.cfg.max_seq_len)
            files += ["tokenizer.json", "tokenizer_config.json"]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(state.cfg, dtype, bos, eos), f, indent=2)
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
