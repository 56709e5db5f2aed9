"""Finding one saved step of a run and reading its files safely.

A run's checkpoints live under RUN_DIR/checkpoints/step_NNNNNNNN/ (see `megalm.training.checkpoint`).
`locate_checkpoint` accepts RUN_DIR, RUN_DIR/checkpoints or a step directory itself, so users can
point the tools at whatever path they have.

Every `.pt` file is read with `torch.load(weights_only=True)`: nothing in a checkpoint can run code.
DeepSpeed's ZeRO optimizer files pickle three small DeepSpeed types (a dataclass of two ints, the
loss-scaler's settings, an enum); they are the only globals allowed, and only for those files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megalm.config.run import RunConfig
from megalm.rundir import (CHECKPOINTS_DIR, META_FILE, TAG_EXAMPLE, CheckpointError, checkpoint_root,
                           complete_steps, latest_file, meta_file, read_latest, read_meta, tag_for)

__all__ = ["CheckpointError", "CheckpointRef", "list_checkpoints", "load_pt", "locate_checkpoint"]


@dataclass
class CheckpointRef:
    """One complete step: where it is and its megalm.json."""

    root: str  # RUN_DIR/checkpoints
    tag: str  # step_NNNNNNNN
    meta: dict

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def run_dir(self) -> str:
        return os.path.dirname(self.root)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def meta_path(self) -> str:
        """This step's megalm.json (the file to name in errors about its metadata)."""
        return meta_file(self.path)

    def layout(self) -> tuple[int, int, int, int]:
        """(tp, pp, dp, zero_stage) the step was saved at, from its megalm.json."""
        layout = self.meta.get("layout") or {}
        try:
            return tuple(int(layout[k]) for k in ("tp", "pp", "dp", "zero_stage"))  # type: ignore[return-value]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.meta_path}: 'layout' must give tp, pp, dp and zero_stage; "
                                  f"got {layout!r}") from None

    def run_config(self) -> RunConfig:
        """The typed run config this step was trained with; a ConfigError naming its megalm.json when
        that cannot be parsed. Tools read fields from here, never from the raw metadata dict."""
        return RunConfig.from_checkpoint_meta(self.meta, self.meta_path)


def _root_of(path: str) -> tuple[str, Optional[str]]:
    """(checkpoints root, tag or None) for RUN_DIR, RUN_DIR/checkpoints or a step directory."""
    path = os.path.abspath(path)
    if os.path.isfile(meta_file(path)):  # a step directory
        return os.path.dirname(path), os.path.basename(path)
    if os.path.basename(path) == CHECKPOINTS_DIR or os.path.isfile(latest_file(path)):
        return path, None
    return checkpoint_root(path), None


def list_checkpoints(path: str) -> list[int]:
    """Steps of the complete checkpoints under a run directory (ascending)."""
    return complete_steps(_root_of(path)[0])


def locate_checkpoint(path: str, step: Optional[int] = None) -> CheckpointRef:
    """The checkpoint of `step` (default: the one `latest` names, else the newest complete one)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such run directory or checkpoint (give RUN_DIR, "
                              f"RUN_DIR/{CHECKPOINTS_DIR} or RUN_DIR/{CHECKPOINTS_DIR}/{TAG_EXAMPLE})")
    root, tag = _root_of(path)
    steps = complete_steps(root)
    if tag is not None and step is not None and tag != tag_for(step):
        raise CheckpointError(f"{path} is the checkpoint of {tag}, but --step {step} was asked for; "
                              f"give the run directory to choose among steps {steps}")
    if tag is None:
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{root}: no complete checkpoint for step {step}; available steps: "
                                      f"{', '.join(map(str, steps)) if steps else 'none'}")
            tag = tag_for(step)
        else:
            tag = read_latest(root) or (tag_for(steps[-1]) if steps else None)
            if tag is None:
                raise CheckpointError(f"{root}: no complete checkpoint found (a {TAG_EXAMPLE} directory with "
                                      f"{META_FILE}); has the run saved one yet? (train.save_interval / save_at_end)")
    return CheckpointRef(root=root, tag=tag, meta=read_meta(root, tag))


def _deepspeed_safe_globals() -> list:
    # Imported lazily: deepspeed is slow to import and only ZeRO optimizer files need these.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, ZeroStageEnum]


def load_pt(path: str, deepspeed_types: bool = False, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU; a missing, truncated or foreign file is a
    CheckpointError naming it. `deepspeed_types` allows the three DeepSpeed types ZeRO optimizer
    files contain (and nothing else). `mmap` maps the tensors' storage instead of reading it: pages are
    read when a slice is used (a reader that needs a few parameters of a partition file)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file is missing (the checkpoint is incomplete or was "
                              f"written with another layout than its {META_FILE} says)")
    try:
        if deepspeed_types:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/... for damaged files
        size = os.path.getsize(path)
        raise CheckpointError(f"{path}: cannot read this checkpoint file ({size} bytes): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}. The file is truncated or corrupt; "
                              f"use another step (--step) or restore the file from a copy") from None
