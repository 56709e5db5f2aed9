"""Which exceptions are the user's to fix, and the one line `megalm-train` prints for them.

A user error is a problem in what the user gave the trainer (config, shards, checkpoints, free disk),
not a bug: it is reported as `megalm-train: <what>: <fix>` by rank 0 alone, and every rank exits 2,
instead of one traceback per rank. Anything else is a bug and keeps its traceback.

Torch-free at import (the entry point reports config and shard errors before importing torch);
`user_errors()` adds the two types that live in torch modules.
"""
from __future__ import annotations

from data_prep.errors import PrepError
from data_prep.mmidx import ShardFormatError
from megalm.config import ConfigError
from megalm.rundir import CheckpointError

EXIT_CODE = 2  # as for config errors; `megalm-launch run` does not restart on it (--no-restart-codes)
PROG = "megalm-train"

# Raised before torch is imported: config, shard paths and headers, checkpoint metadata.
TORCH_FREE_USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, ShardFormatError, PrepError)


def user_errors() -> tuple[type[BaseException], ...]:
    """Every user-error type; imports torch (PrecisionError, TokenIdError live beside the code that raises them)."""
    from megalm.parallel.layers import TokenIdError
    from megalm.training.precision import PrecisionError

    return TORCH_FREE_USER_ERRORS + (PrecisionError, TokenIdError)


def message(e: BaseException) -> str:
    """The report line for a user error. The exceptions name the file or field; where their message
    has no fix (the shard reader only says what is wrong), it is added here."""
    text = str(e).strip()
    if isinstance(e, ConfigError):
        return f"{PROG}: config error: {text}"
    if isinstance(e, ShardFormatError):
        return (f"{PROG}: data error: {text}; re-create the shard with `megalm-prep tokenize`, or remove it "
                f"from data.train_paths/valid_paths")
    if isinstance(e, (PrepError, CheckpointError)):
        return f"{PROG}: {text}"
    return f"{PROG}: {type(e).__name__}: {text}"
