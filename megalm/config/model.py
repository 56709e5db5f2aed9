"""Model section of a run config: the decoder's shape (Llama-style), its init seed and dropout.

Shape checks that do not depend on the parallel layout live in `validate()`; the ones that do
(heads over tensor-parallel ranks, layers over pipeline stages) in `check_layout(tp, pp)`, so a bad
layout fails before any process group starts (DESIGN.md decision 10).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .loader import ConfigError, from_dict, load_yaml, require

# The named shapes ship inside the package (setup.py package_data), so `load_model_config("tiny")` works
# from an installed copy too, not only from a source checkout.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "models"

# Embedding/output rows are padded to a multiple of (tp * VOCAB_PAD_MULTIPLE): every TP shard of the
# vocabulary then has the same size, and a multiple of 128 keeps the GEMMs tensor-core friendly.
VOCAB_PAD_MULTIPLE = 128


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass
class ModelConfig:
    vocab_size: int  # tokenizer vocabulary, unpadded (see padded_vocab_size)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = num_heads (plain multi-head)
    ffn_hidden_size: Optional[int] = None  # SwiGLU width; None = Llama rule (8/3 * hidden, multiple of 256)
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    init_seed: int = 1234
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    # ---- derived sizes ----
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        # Llama: 2/3 of the classic 4h (SwiGLU has three matrices instead of two), rounded up to 256.
        multiple_of = 256
        ffn = int(2 * 4 * self.hidden_size / 3)
        return multiple_of * ((ffn + multiple_of - 1) // multiple_of)

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of tp*128; the extra rows are never predicted (their
        logits are -inf) and never looked up (token ids are < vocab_size)."""
        multiple = VOCAB_PAD_MULTIPLE * tp
        return multiple * ((self.vocab_size + multiple - 1) // multiple)

    def num_parameters(self) -> int:
        """Parameter count of the unpadded model (vocab_size rows, not the TP padding), counting a
        tied input/output embedding once. Llama-2-7B's shape gives 6,738,415,616."""
        h, L = self.hidden_size, self.num_layers
        qkv = h * (self.num_heads + 2 * self.kv_heads) * self.head_dim
        out = self.num_heads * self.head_dim * h
        mlp = 3 * h * self.ffn_size
        per_layer = qkv + out + mlp + 2 * h  # + two RMSNorm weights
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return embeddings + L * per_layer + h  # + final norm

    # ---- checks ----
    def validate(self, where: str = "model") -> None:
        where = where or "model"
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            require(value > 0, where, name, f"must be > 0, got {value}")
        require(self.hidden_size % self.num_heads == 0, where, "hidden_size",
                f"{self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                f"pick num_heads from the divisors of hidden_size or change hidden_size")
        require(self.kv_heads > 0, where, "num_kv_heads", f"must be > 0 (or null for num_heads), got {self.kv_heads}")
        require(self.num_heads % self.kv_heads == 0, where, "num_kv_heads",
                f"{self.kv_heads} must divide num_heads={self.num_heads} (each kv head serves a whole group "
                f"of query heads); choose one of {_divisors(self.num_heads)}")
        require(self.head_dim % 2 == 0, where, "num_heads",
                f"head_dim = hidden_size/num_heads = {self.head_dim} must be even for rotary embeddings")
        require(self.ffn_size > 0, where, "ffn_hidden_size", f"must be > 0 (or null for the Llama rule), got {self.ffn_size}")
        require(self.rope_theta > 0, where, "rope_theta", f"must be > 0, got {self.rope_theta}")
        require(self.norm_eps > 0, where, "norm_eps", f"must be > 0, got {self.norm_eps}")
        require(self.init_std > 0, where, "init_std", f"must be > 0, got {self.init_std}")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, where, name, f"must be in [0, 1), got {value}")

    def check_layout(self, tp: int, pp: int, where: str = "model") -> None:
        """Fail with a field-named message when this shape cannot be split over tp x pp ranks."""
        where = where or "model"
        if tp < 1 or pp < 1:
            raise ConfigError(f"{where}: tensor_parallel={tp} and pipeline_parallel={pp} must both be >= 1")
        require(self.num_heads % tp == 0, where, "num_heads",
                f"{self.num_heads} query heads cannot be split over tensor_parallel={tp} ranks; "
                f"use a tensor_parallel that divides {self.num_heads} ({_divisors(self.num_heads)})")
        require(self.kv_heads % tp == 0, where, "num_kv_heads",
                f"{self.kv_heads} kv heads cannot be split over tensor_parallel={tp} ranks (each rank needs "
                f"whole kv heads); use a tensor_parallel that divides {self.kv_heads} ({_divisors(self.kv_heads)})")
        require(self.ffn_size % tp == 0, where, "ffn_hidden_size",
                f"{self.ffn_size} is not divisible by tensor_parallel={tp}")
        require(self.num_layers >= pp, where, "num_layers",
                f"{self.num_layers} layers cannot fill pipeline_parallel={pp} stages (each stage needs at "
                f"least one transformer block); use pipeline_parallel <= {self.num_layers}")


def load_model_config(name_or_path: str | os.PathLike, where: str = "model") -> ModelConfig:
    """`tiny`, `7b`, ... (a file in megalm/config/models/) or a path to a YAML file of ModelConfig fields."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or os.sep in text or path.is_file()):
        path = MODEL_CONFIG_DIR / f"{text}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(f"{where}: unknown model {text!r}; known: {', '.join(known)} (or give a YAML path)")
    return from_dict(ModelConfig, load_yaml(path), where)
