"""Training section: batch sizes, optimiser, schedule, precision, logging and checkpoint cadence."""
from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from .loader import ConfigError, require


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_steps: int = 100
    seed: int = 1234
    # Optimiser (AdamW).
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_steps: Optional[int] = None  # default: train_steps
    weight_decay: float = 0.1
    # Norm gains and embeddings are conventionally excluded from weight decay (Megatron, Llama).
    no_decay_norms: bool = True
    no_decay_embeddings: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    # Non-finite loss or grad norm: the step is skipped and counted; this many in a row stops the run.
    max_consecutive_nonfinite: int = 5
    # Logging, evaluation, checkpoints.
    run_dir: str = "runs/default"
    log_interval: int = 10
    eval_interval: int = 0  # 0 = no periodic validation
    eval_iters: int = 4
    save_interval: int = 0  # 0 = only on signals and at the end
    keep_last: int = 3
    save_at_end: bool = True
    tensorboard: bool = True
    # Audit: every step's dataset sample indices (all data-parallel ranks) as a `samples` line in
    # metrics.jsonl, so "which samples did step k train on" is answerable after resumes and layout changes.
    log_sample_ids: bool = False
    # Peak dense TFLOP/s of one device, for MFU; None = measure nothing against a peak (MFU not shown).
    peak_tflops: Optional[float] = None
    # DeepSpeed fields merged last into the generated DeepSpeed config: a JSON file's path or an inline
    # mapping. Keys the run config owns (batch sizes, ZeRO stage, precision, clipping, optimiser, LR
    # schedule) are refused unless they agree: megalm.config.deepspeed_overrides.
    deepspeed_config: Optional[Union[str, dict[str, Any]]] = None
    # Weights to start from when the run starts fresh (no checkpoint of its own to resume): a megalm
    # RUN_DIR (its latest step), RUN_DIR/checkpoints/step_N, or a Hugging Face LlamaForCausalLM directory.
    # Weights only: optimizer, LR schedule and step counter start fresh (megalm/training/init_from.py).
    init_from: Optional[str] = None

    def validate(self, where: str = "train") -> None:
        where = where or "train"
        for name in ("micro_batch_size", "global_batch_size", "train_steps"):
            require(getattr(self, name) >= 1, where, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0, where, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, where, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        require(self.warmup_steps >= 0, where, "warmup_steps", "must be >= 0")
        require(self.keep_last >= 1, where, "keep_last", "must be >= 1 (the latest checkpoint is always kept)")
        require(self.log_interval >= 1, where, "log_interval", "must be >= 1")
        require(self.max_consecutive_nonfinite >= 1, where, "max_consecutive_nonfinite", "must be >= 1")
        require(self.init_from is None or self.init_from.strip() != "", where, "init_from",
                "must be a path (a megalm run or step directory, or a Hugging Face model directory) or null")

    def check_init_from(self) -> None:
        """`init_from` names something: checked before any process group (what it holds is checked by
        megalm.training.init_from once the run knows it starts fresh)."""
        if self.init_from is not None:
            check_init_from_path(self.init_from)

    def gradient_accumulation_steps(self, dp: int, where: str = "train") -> int:
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step != 0:
            raise ConfigError(
                f"{where}.global_batch_size: {self.global_batch_size} is not divisible by micro_batch_size x dp = "
                f"{self.micro_batch_size} x {dp} = {per_step}; global batch = micro batch x grad accumulation x dp")
        return self.global_batch_size // per_step


def check_init_from_path(path: str) -> None:
    """The one existence rule (and message) for `train.init_from`."""
    if not os.path.exists(path):
        raise ConfigError(f"train.init_from: {path} does not exist; give a megalm RUN_DIR, "
                          f"RUN_DIR/checkpoints/step_N or a Hugging Face model directory (config.json + safetensors)")
