"""Measured peak memory of a training step on CPU, for validating the planner's memory model.

CPU tensors have no `torch.cuda.max_memory_allocated`. What comes closest is the c10 CPU allocator's own
accounting, which the PyTorch profiler exposes with `profile_memory=True`: every allocation and free of
tensor storage made while profiling, with its size, in order. Summing them gives the bytes of live tensor
storage over time; its maximum is the CPU analogue of the CUDA allocator's peak allocated bytes (what
a GPU would need, before the caching allocator's fragmentation). Peak RSS is not used: it counts the
Python/torch runtime (~0.4 GB), pages of `torch.empty` buffers that are never touched are missing from
it, and glibc keeps freed memory.

The profiler records the thread that started it (autograd's CPU backward runs on that thread too), and
only allocations made after it started, so profiling starts before the model and the engine are built.
Frees made on other threads are not seen either: gloo's worker threads sometimes drop the last reference
to a communicated tensor, so with TP the tracked bytes drift upward from step to step (the live tensors
do not). Measure TP layouts over one step.
"""
from __future__ import annotations


class AllocationTracker:
    """Context manager: `.peak` / `.current` bytes of tensor storage allocated since entering."""

    def __init__(self) -> None:
        self.peak = 0
        self.current = 0
        self._prof = None

    def __enter__(self) -> "AllocationTracker":
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += e.nbytes()
            peak = max(peak, cur)
        self.peak, self.current = peak, cur


def synthetic_micro_batches(cfg, accum: int, generator) -> list:
    """`accum` (input_ids, labels) micro-batches of uniform random tokens, shaped as the data pipeline
    delivers them (`cfg`: a RunConfig). Token values do not change memory or time per step."""
    import torch

    out = []
    for _ in range(accum):
        toks = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1),
                             generator=generator)
        out.append((toks[:, :-1].contiguous(), toks[:, 1:].contiguous()))
    return out


def measure_training_peak(config: str, overrides: list[str], steps: int = 2) -> dict:
    """Run on every rank of an initialised gloo group: build our engine for the run config and train
    `steps` steps on synthetic tokens; returns this rank's peak tracked tensor bytes."""
    import torch

    from megalm.config.run import load_run_config
    from megalm.parallel.grid import destroy_process_grid, initialize_process_grid
    from megalm.training.engine import build_engine

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # no-op when already up
    cfg = load_run_config(config, overrides)
    with AllocationTracker() as tracker:
        grid = initialize_process_grid(cfg.parallel.tp, cfg.parallel.pp)
        accum = cfg.train.gradient_accumulation_steps(grid.dp)
        engine = build_engine(cfg, grid)
        g = torch.Generator().manual_seed(grid.dp_rank)
        for _ in range(steps):
            engine.train_step(synthetic_micro_batches(cfg, accum, g))
        engine.close()
        del engine
    destroy_process_grid()
    return {"peak_bytes": tracker.peak}
