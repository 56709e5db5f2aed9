"""`train.init_from`: a fresh run starts from another model's weights (DESIGN decision 39).

Sources: a megalm RUN_DIR (its latest step), RUN_DIR/checkpoints/step_N (any layout: read tensor by
tensor by `megalm.export.shard_reader`, each rank keeping its slice), or a Hugging Face LlamaForCausalLM directory (read by `megalm-import`'s
converter, `megalm.export.hf_import`). Only the weights are taken, into whatever (tp, pp, dp, ZeRO)
layout this run has (`megalm.export.engine_state`); the optimizer, LR schedule, step
counter and consumed samples are this run's own, from zero.

It applies only when the run starts fresh: a run dir with a checkpoint to resume resumes it and never
reads the source again, so a restarted fine-tune continues itself (the source's step and schedule mean
nothing to it). Checked before any dataset or engine is built, every difference in one error: each
ModelConfig field that changes what the weights compute, and the tokenizer's sha256 when both sides
have one. Recorded in megalm.json `init_from` {path, format, step, sha256 of the source's megalm.json or
config.json}, carried over by every later checkpoint of the run.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from megalm.config import ConfigError
from megalm.config.model import ModelConfig
from megalm.config.train import check_init_from_path
from megalm.config.run import RunConfig
from megalm.rundir import CheckpointError

from .resume import ResumePoint

META_KEY = "init_from"
# Fields that do not change what the weights compute, so a fine-tune may set its own: init_* are unused
# when weights are loaded, dropout is a training choice, and RoPE has no learned positions (max_seq_len
# only bounds the context). Every other ModelConfig field, present or future, must match.
NOT_COMPARED = ("init_std", "init_seed", "attention_dropout", "hidden_dropout", "max_seq_len")
# Optional fields are compared by what they resolve to (null kv heads = num_heads, null ffn = Llama rule).
RESOLVED = {"num_kv_heads": "kv_heads", "ffn_hidden_size": "ffn_size"}


@dataclass
class InitSource:
    format: str  # "megalm" or "hf"
    path: str  # the step directory, or the HF directory
    step: Optional[int]  # None for an HF model
    sha256: str  # of the source's megalm.json / config.json
    model: ModelConfig
    tokenizer_sha256: Optional[str]

    def record(self) -> dict:
        return {"path": self.path, "format": self.format, "step": self.step, "sha256": self.sha256}


def resolve_source(path: str, run_dir: str) -> InitSource:
    """What `train.init_from` names; a ConfigError when it names nothing usable."""
    from data_prep.tokenizer import file_sha256
    from megalm.export import hf_import
    from megalm.export.checkpoint_files import locate_checkpoint
    from megalm.export.consolidate import model_config_of

    where = f"train.init_from: {path}"
    check_init_from_path(path)
    if hf_import.is_hf_dir(path):
        hf_dir = os.path.abspath(path)
        config = hf_import.hf_config_path(hf_dir)
        tok = hf_import.hf_tokenizer_path(hf_dir)
        return InitSource("hf", hf_dir, None, file_sha256(config),
                          hf_import.model_config_from_hf(hf_import.read_hf_config(hf_dir), config),
                          file_sha256(tok) if tok else None)
    try:
        ref = locate_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    if os.path.abspath(ref.run_dir) == os.path.abspath(run_dir):
        raise ConfigError(f"{where} is this run's own directory; continue it with --resume auto instead")
    return InitSource("megalm", ref.path, ref.step, file_sha256(ref.meta_path),
                      model_config_of(ref.meta, ref.meta_path), ref.meta.get("tokenizer_sha256"))


def _compared(cfg: ModelConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, RESOLVED.get(f.name, f.name)) for f in dataclasses.fields(ModelConfig)
            if f.name not in NOT_COMPARED}


def differences(source: InitSource, cfg: RunConfig, tokenizer_sha256: Optional[str]) -> list[str]:
    """One line per field in which the source and this run disagree."""
    theirs, ours = _compared(source.model), _compared(cfg.model)
    out = [f"model.{name}: source {theirs[name]!r} vs this run {ours[name]!r}" for name in ours
           if theirs[name] != ours[name]]
    if source.tokenizer_sha256 and tokenizer_sha256 and source.tokenizer_sha256 != tokenizer_sha256:
        out.append(f"data.tokenizer (sha256): source {source.tokenizer_sha256!r} vs this run {tokenizer_sha256!r} "
                   f"({cfg.data.tokenizer})")
    return out


def prepare(cfg: RunConfig, point: Optional[ResumePoint], tokenizer_sha256: Optional[str]) -> Optional[InitSource]:
    """The source to load, when the run starts fresh (no resume point) and `train.init_from` is set;
    raises CheckpointError listing every difference from this run's model and tokenizer."""
    if point is not None or cfg.train.init_from is None:
        return None
    source = resolve_source(cfg.train.init_from, cfg.train.run_dir)
    problems = differences(source, cfg, tokenizer_sha256)
    if problems:
        raise CheckpointError(
            f"train.init_from: {source.path} does not fit this run:\n  " + "\n  ".join(problems)
            + "\nSet these fields to the source's values (its model and data.tokenizer), or start from another source")
    return source


def record(meta: dict, source: Optional[InitSource], point: Optional[ResumePoint]) -> None:
    """Put the source into this run's checkpoint metadata: the one loaded now, or the one the resumed
    checkpoint records (so every checkpoint of a fine-tune names what it started from)."""
    if source is not None:
        meta[META_KEY] = source.record()
    elif point is not None and point.meta.get(META_KEY) is not None:
        meta[META_KEY] = point.meta[META_KEY]


def load_weights(engine: Any, source: InitSource, cfg: RunConfig) -> None:
    """Collective: every rank reads the source's weights one full tensor at a time and keeps its slice.
    The engine's fresh optimizer state, LR schedule and counters are left as built."""
    from megalm.export.checkpoint_files import locate_checkpoint
    from megalm.export.engine_state import apply_checkpoint, apply_full_state
    from megalm.export.full_weights import check_full_weights
    from megalm.export.hf_import import hf_full_state
    from megalm.export.shard_reader import ShardReader

    if source.format == "hf":
        state = hf_full_state(source.path, source.model)
        check_full_weights(state.weights, cfg.model, source.path)
        # engine_state={}: apply_full_state restores a schedule and counters from it, which a fresh run must not take
        state = dataclasses.replace(state, cfg=cfg.model, moments=None, adam_step=None, engine_state={})
        apply_full_state(engine, state, weights_only=True)
    else:  # a megalm step of any layout, read tensor by tensor: no rank gathers the model
        apply_checkpoint(engine, ShardReader(locate_checkpoint(source.path)), schedule=False)
    if dist.get_rank() == 0:
        step = f" (step {source.step})" if source.step is not None else ""
        print(f"initialised weights from {source.path}{step}; optimizer, schedule and step counter start fresh",
              flush=True)
