"""TP-aware random streams for dropout (Megatron's CudaRNGStatesTracker, made device-generic).

Two streams per rank:
  * the default generator, seeded identically on all TP ranks of a stage: dropout on replicated
    activations (after a row-parallel reduce, on the embeddings) must drop the same elements on every
    TP rank, or the replicas diverge;
  * the tracker's "model-parallel" stream, distinct per TP rank: dropout on TP-sharded activations
    (attention probabilities of this rank's heads) must be independent across shards, or every shard
    would reuse one mask.
`fork()` swaps the tracker's state into the default generator of the device for the duration of a
block, so ordinary ops (F.dropout, SDPA's dropout) draw from it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _get_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def _set_state(device: str, state: torch.Tensor) -> None:
    if device == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states that can be swapped in for the device's default generator."""

    def __init__(self, device: str | None = None):
        self.device = device or _device_type()
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: set[int] = set()

    def reset(self) -> None:
        self._states.clear()
        self._seeds.clear()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self._seeds:
            raise ValueError(f"RNG seed {seed} is already used by another stream")
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        self._seeds.add(seed)
        saved = _get_state(self.device)
        if self.device == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self._states[name] = _get_state(self.device)
        _set_state(self.device, saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self._states:
            raise RuntimeError(f"RNG stream {name!r} is not set up; call "
                               f"megalm.parallel.random.model_parallel_seed(seed, tp_rank, pp_rank) before "
                               f"running dropout inside tensor-parallel regions")
        saved = _get_state(self.device)
        _set_state(self.device, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device)
            _set_state(self.device, saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int = 0) -> None:
    """Seed both streams (Megatron's offsets): default = seed + 100*pp_rank, equal across TP ranks;
    model-parallel = that + 2718 + tp_rank, distinct per TP rank."""
    stage_seed = seed + 100 * pp_rank
    torch.manual_seed(stage_seed)  # also seeds every CUDA device
    _TRACKER.device = _device_type()
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, stage_seed + 2718 + tp_rank)


def checkpoint_rng_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for torch.utils.checkpoint: the recomputation sees the tracker's streams as they
    were at forward time, so recomputed dropout masks equal the original ones. (torch restores the
    default generator itself; the tracker's states are invisible to it.)"""
    saved = _TRACKER.get_states()

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        current = _TRACKER.get_states()
        _TRACKER.set_states(saved)
        try:
            yield
        finally:
            _TRACKER.set_states(current)

    return contextlib.nullcontext(), recompute()
