"""`megalm-import`: a Hugging Face `LlamaForCausalLM` directory -> a megalm run directory at step 0.

    megalm-import --hf DIR --output RUN_DIR [--tp T --pp P --dp D --zero-stage Z]
                  [--data PREFIX ...] [--seq-len S]

DIR holds config.json, model.safetensors (or model-*.safetensors + model.safetensors.index.json) and,
usually, tokenizer.json. RUN_DIR gets config.yaml (a valid run config at that layout), the tokenizer
(its data.tokenizer) and checkpoints/step_00000000, written by training's own checkpoint code
(`megalm.export.engine_writer.save_with_workers`: T*P*D local gloo ranks build the layout's engine, load the
weights and save), so `train.init_from`, `--resume auto`, megalm-eval, -generate and -export read it
like any checkpoint. The same converter (`model_config_from_hf`, `read_hf_weights`) is what
`train.init_from: HF_DIR` reads through.

What megalm does not implement is refused, naming the config.json field: another model_type or
architecture, rope scaling, attention/MLP biases, an activation other than SiLU, a head_dim that is not
hidden_size / num_attention_heads, quantized weights. Weights are stored as fp32 (bf16 and fp16 widen
exactly, so `megalm-export --dtype` of the original dtype gives the original bits back).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Optional

import torch

from megalm import rundir
from megalm.config import ConfigError, from_dict, to_dict
from megalm.config.model import ModelConfig
from megalm.config.run import RunConfig, run_config_from_dict
from megalm.model.params import hf_llama_name, merge_qkv

from .checkpoint_files import CheckpointError, CheckpointRef, list_checkpoints, locate_checkpoint
from .consolidate import FullState
from .full_weights import check_full_weights, expected_shapes
from .safetensors_out import INDEX_FILE, SINGLE_FILE

HF_CONFIG_FILE = "config.json"
HF_TOKENIZER_FILE = "tokenizer.json"
# LlamaConfig's defaults for the fields a config.json may leave out.
HF_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
               "tie_word_embeddings": False}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# data.train_paths must name something for config.yaml to be a valid run config; this names the fix.
NO_DATA = "SET-data.train_paths-to-your-token-shards"
DEFAULT_SEQ_LEN = 2048


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, HF_CONFIG_FILE))


def hf_config_path(hf_dir: str) -> str:
    return os.path.join(hf_dir, HF_CONFIG_FILE)


def hf_tokenizer_path(hf_dir: str) -> Optional[str]:
    """The directory's tokenizer.json, or None when it has none."""
    path = os.path.join(hf_dir, HF_TOKENIZER_FILE)
    return path if os.path.isfile(path) else None


def read_hf_config(hf_dir: str) -> dict:
    path = hf_config_path(hf_dir)
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir}: no {HF_CONFIG_FILE}; give a Hugging Face model directory "
                              f"(what save_pretrained writes)")
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _unsupported(hf: dict) -> list[str]:
    """One line per config.json field whose value megalm's decoder does not implement."""
    problems = []
    if hf.get("model_type") != "llama":
        problems.append(f"model_type: {hf.get('model_type')!r}; megalm implements only 'llama' (LlamaForCausalLM)")
    arch = hf.get("architectures")
    if arch is not None and arch != ["LlamaForCausalLM"]:
        problems.append(f"architectures: {arch!r}; only ['LlamaForCausalLM'] (a decoder with its LM head)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act: {hf['hidden_act']!r}; megalm's SwiGLU uses 'silu'")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            problems.append(f"{name}: true; megalm's linear layers have no bias")
    if hf.get("rope_scaling") is not None:
        problems.append(f"rope_scaling: {hf['rope_scaling']!r}; megalm implements plain RoPE (rope_theta only): "
                        f"use a model without rope scaling")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type: {rope['rope_type']!r}; megalm implements plain RoPE "
                        f"('default', rope_theta only)")
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if factor not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor: {factor!r}; megalm rotates the whole head (1.0)")
    heads, hidden = hf.get("num_attention_heads"), hf.get("hidden_size")
    if hf.get("head_dim") is not None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0 \
            and hf["head_dim"] != hidden // heads:
        problems.append(f"head_dim: {hf['head_dim']} but hidden_size / num_attention_heads = {hidden // heads}; "
                        f"megalm's head_dim is always hidden_size / num_heads")
    if hf.get("quantization_config") is not None:
        problems.append("quantization_config: quantized weights cannot be imported; use the unquantized model")
    problems += [f"{name}: missing" for name in REQUIRED if name not in hf]
    return problems


def model_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """Our ModelConfig for a LlamaForCausalLM config.json (`where` names the file in errors); every
    unsupported field is listed in one CheckpointError."""
    problems = _unsupported(hf)
    if problems:
        raise CheckpointError(f"{where}: this model uses what megalm does not implement:\n  "
                              + "\n  ".join(problems) + "\nmegalm-import reads plain Llama models only")
    get = lambda name: hf[name] if hf.get(name) is not None else HF_DEFAULTS[name]  # noqa: E731
    rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", get("rope_theta"))
    fields = {
        "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"], "num_kv_heads": hf.get("num_key_value_heads"),
        "ffn_hidden_size": hf["intermediate_size"], "max_seq_len": get("max_position_embeddings"),
        "rope_theta": rope_theta, "norm_eps": get("rms_norm_eps"), "tie_embeddings": get("tie_word_embeddings"),
        "attention_dropout": hf.get("attention_dropout") or 0.0,
    }
    if hf.get("initializer_range") is not None:
        fields["init_std"] = hf["initializer_range"]
    try:
        return from_dict(ModelConfig, fields, "model")
    except ConfigError as e:
        raise CheckpointError(f"{where}: does not map to a valid megalm model: {e}") from None


def _weight_files(hf_dir: str) -> list[str]:
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(hf_dir, INDEX_FILE)
    if not os.path.isfile(index):
        raise CheckpointError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}; megalm-import reads safetensors "
                              f"only: re-save the model with save_pretrained(..., safe_serialization=True)")
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
    return [os.path.join(hf_dir, name) for name in sorted(set(weight_map.values()))]


def _read_tensors(hf_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the directory's safetensors files, and the file each came from."""
    from safetensors import SafetensorError, safe_open

    tensors, origin = {}, {}
    for path in _weight_files(hf_dir):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    tensors[key], origin[key] = f.get_tensor(key), path
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read this safetensors file ({e}); re-download or re-save "
                                  f"it") from None
    return tensors, origin


def _qkv_hf_names(gpt_qkv_name: str) -> tuple[str, str, str]:
    """HF's q/k/v_proj names of a fused qkv, derived from the o_proj row of megalm.model.params."""
    o_proj = hf_llama_name(gpt_qkv_name.replace(".qkv.", ".o_proj."))
    return tuple(o_proj.replace(".o_proj.", f".{p}_proj.") for p in "qkv")  # type: ignore[return-value]


def gpt_weights(hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str,
                origin: Optional[dict[str, str]] = None) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM tensors -> full weights in GPTModel names (fp32; q/k/v fused by merge_qkv).
    A missing, extra or mis-shaped tensor is a CheckpointError naming each."""
    used: set[str] = set()
    problems: list[str] = []
    out: dict[str, torch.Tensor] = {}
    hd, h = cfg.head_dim, cfg.hidden_size
    for name in expected_shapes(cfg):
        if name.endswith(".attention.qkv.weight"):
            names = _qkv_hf_names(name)
            want = [(cfg.num_heads * hd, h), (cfg.kv_heads * hd, h), (cfg.kv_heads * hd, h)]
            missing = [n for n in names if n not in hf]
            bad = [f"{n}: shape {tuple(hf[n].shape)} but the config needs {w}" for n, w in zip(names, want)
                   if n in hf and tuple(hf[n].shape) != w]
            problems += [f"{n}: missing" for n in missing] + bad
            if not missing and not bad:
                out[name] = merge_qkv(*(hf[n].float() for n in names), cfg)
            used.update(names)
        else:
            hf_name = hf_llama_name(name)
            used.add(hf_name)
            if hf_name in hf:
                out[name] = hf[hf_name].float()
            else:
                problems.append(f"{hf_name}: missing")
    # Older transformers save the tied head too; it must be the embedding itself.
    if cfg.tie_embeddings and "lm_head.weight" in hf:
        used.add("lm_head.weight")
        embed = hf.get(hf_llama_name("embedding.weight"))
        if embed is not None and not torch.equal(hf["lm_head.weight"], embed):
            problems.append("lm_head.weight: differs from model.embed_tokens.weight but tie_word_embeddings is true")
    problems += [f"{n}: not a LlamaForCausalLM weight of this config"
                 + (f" (in {origin[n]})" if origin and n in origin else "") for n in sorted(set(hf) - used)]
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise CheckpointError(f"{where}: the weights do not match its {HF_CONFIG_FILE}:\n  " + "\n  ".join(shown))
    out = {n: t.contiguous() for n, t in out.items()}
    check_full_weights(out, cfg, where)
    return out


def read_hf_weights(hf_dir: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    tensors, origin = _read_tensors(hf_dir)
    return gpt_weights(tensors, cfg, hf_dir, origin)


def hf_full_state(hf_dir: str, cfg: Optional[ModelConfig] = None) -> FullState:
    """The directory as a layout-free FullState at step 0 (weights only). Its `ref` is not a megalm
    checkpoint: it carries where the weights came from and the step-0 counters the writer saves."""
    hf_dir = os.path.abspath(hf_dir)
    if cfg is None:
        cfg = model_config_from_hf(read_hf_config(hf_dir), hf_config_path(hf_dir))
    ref = CheckpointRef(root=hf_dir, tag="", meta={"model": to_dict(cfg), "step": 0, "consumed_samples": 0,
                                                    "skipped_steps": 0})
    return FullState(cfg=cfg, weights=read_hf_weights(hf_dir, cfg), ref=ref)


def import_config(model: ModelConfig, output: str, tp: int, pp: int, dp: int, zero_stage: int,
                  data: Optional[list[str]], seq_len: Optional[int], tokenizer: Optional[str]) -> RunConfig:
    """The run config written to RUN_DIR/config.yaml, validated like a training config."""
    if dp < 1:
        raise ConfigError(f"--dp: must be >= 1, got {dp}")
    per_step = dp  # micro_batch_size 1: the default global batch of 8 when dp divides it, else dp
    return run_config_from_dict({
        "model": to_dict(model),
        "parallel": {"tp": tp, "pp": pp, "zero_stage": zero_stage},
        "data": {"train_paths": list(data or [NO_DATA]), "tokenizer": tokenizer,
                 "seq_len": seq_len or min(DEFAULT_SEQ_LEN, model.max_seq_len)},
        "train": {"run_dir": os.path.abspath(output), "micro_batch_size": 1,
                  "global_batch_size": 8 if 8 % per_step == 0 else per_step},
    })


def import_meta(cfg: RunConfig, dp: int, hf_dir: str, tokenizer: Optional[str]) -> dict:
    """megalm.json of the imported step: the fields training's checkpoint_meta writes (the layout, the
    config and the tokenizer hash that resume and the tools check) and where the weights came from."""
    import deepspeed

    from data_prep.tokenizer import file_sha256

    d = cfg.to_dict()
    return {
        "config": d, "model": d["model"],
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp, "zero_stage": cfg.parallel.zero_stage,
                   "world_size": cfg.parallel.tp * cfg.parallel.pp * dp},
        "data_seed": cfg.data.seed,
        "tokenizer_sha256": file_sha256(tokenizer) if tokenizer else None,
        "deepspeed_version": deepspeed.__version__, "torch_version": torch.__version__,
        "imported_from": {"path": hf_dir, "format": "hf", "config_sha256": file_sha256(hf_config_path(hf_dir))},
    }


def _copy_tokenizer(hf_dir: str, output: str, vocab_size: int) -> Optional[str]:
    """Copy DIR/tokenizer.json into the run directory after checking that it loads and fits the model."""
    from data_prep.errors import PrepError
    from data_prep.tokenizer import load_tokenizer

    src = hf_tokenizer_path(hf_dir)
    if src is None:
        return None
    try:
        tok = load_tokenizer(src)
    except PrepError as e:
        raise CheckpointError(str(e)) from None
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{src}: {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    dst = rundir.tokenizer_file(output)
    shutil.copyfile(src, dst)
    return dst


def import_hf(hf_dir: str, output: str, tp: int = 1, pp: int = 1, dp: int = 1, zero_stage: int = 0,
              data: Optional[list[str]] = None, seq_len: Optional[int] = None) -> str:
    """Import one HF directory; spawns tp*pp*dp local ranks. Returns the step-0 checkpoint directory."""
    from .engine_writer import save_with_workers

    hf_dir = os.path.abspath(hf_dir)
    model = model_config_from_hf(read_hf_config(hf_dir), hf_config_path(hf_dir))
    tokenizer = rundir.tokenizer_file(os.path.abspath(output)) if hf_tokenizer_path(hf_dir) else None
    cfg = import_config(model, output, tp, pp, dp, zero_stage, data, seq_len, tokenizer)  # layout errors first
    if list_checkpoints(output):
        raise CheckpointError(f"{output} already holds checkpoints {list_checkpoints(output)}; import into a new "
                              f"run directory")
    state = hf_full_state(hf_dir, model)
    created = not os.path.exists(output)
    os.makedirs(cfg.train.run_dir, exist_ok=True)
    try:
        _copy_tokenizer(hf_dir, cfg.train.run_dir, model.vocab_size)
        save_with_workers(state, cfg, import_meta(cfg, dp, hf_dir, tokenizer), weights_only=True, world=tp * pp * dp)
        rundir.write_atomic(rundir.config_file(cfg.train.run_dir), _yaml(cfg.to_dict()))
    except BaseException:
        if created:  # leave nothing half-imported behind
            shutil.rmtree(cfg.train.run_dir, ignore_errors=True)
        raise
    return locate_checkpoint(output, 0).path


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm-import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face LlamaForCausalLM directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="new megalm run directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0)
    p.add_argument("--data", nargs="+", default=None, help="data.train_paths of the written config (token shards)")
    p.add_argument("--seq-len", type=int, default=None, help=f"data.seq_len (default: min({DEFAULT_SEQ_LEN}, "
                                                             f"max_position_embeddings))")
    args = p.parse_args(argv)
    try:
        path = import_hf(args.hf, args.output, args.tp, args.pp, args.dp, args.zero_stage, args.data, args.seq_len)
    except (CheckpointError, ConfigError) as e:
        print(f"megalm-import: {e}", file=sys.stderr)
        return 2
    world = args.tp * args.pp * args.dp
    print(f"wrote {path}\nfine-tune from it with train.init_from={args.output}, or continue it with: "
          f"torchrun --nproc_per_node={world} -m megalm.train --config {rundir.config_file(args.output)} --resume auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
