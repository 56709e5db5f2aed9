"""`megalm-eval`: loss, perplexity and token count of saved checkpoints on validation shards.

    megalm-eval --checkpoint RUN_DIR [--step N | --all-steps] [--data PREFIX ...] [--max-tokens N]
                [--seq-len S] [--micro-batch-size B] [--output results.json]
    torchrun --nproc_per_node=K -m megalm.eval.evaluate --checkpoint RUN_DIR --tp T --pp P ...
    srun -n K python -m megalm.eval.evaluate --checkpoint RUN_DIR --tp T --pp P ...

A checkpoint of any (tp, pp, dp, ZeRO) layout is evaluated in one process (CPU by default, the GPU
when there is one) or at any (T, P, K/(T*P)) grid under torchrun, srun or mpirun (the launch mapping
is megalm-train's, `megalm.training.launch_env`): its own layout or another. Nothing is consolidated:
each rank builds only its pipeline stage at its TP shard and fills it tensor by tensor from the shard
files (`model_loading.load_stage`, `shard_reader`), so a rank holds its stage plus one full tensor.
Stages pass hidden states forward, the last computes the vocab-parallel loss, data-parallel ranks
split the windows and the sums are all-reduced (`stages`), so every rank gets the single-process
numbers (within fp32 rounding; the tests hold them to 1e-5). Layouts the model or the world cannot
hold fail before any process group, naming --tp/--pp. Windows are contiguous and unshuffled
(`megalm.eval.windows`), the loss is the mean over every predicted token, so results do not depend on
layout or batch size beyond fp32 rounding. Rank 0 writes RUN_DIR/eval/step_NNNNNNNN.json and
TensorBoard scalars under RUN_DIR/eval/tensorboard (one point per checkpoint step: `--all-steps`
draws the validation curve).
--data defaults to the run's validation data: data.valid_paths, or the data.split validation documents.

    megalm-eval --checkpoint RUN_DIR --tasks NAMES|DIR [--step N | --all-steps] [--limit N]

scores lm-evaluation-harness tasks instead (the shipped megalm_larger and megalm_copy, lm-eval's own
task names, or a directory of task YAMLs), offline, through the registered `megalm` lm-eval model:
RUN_DIR/eval/tasks_step_NNNNNNNN.json and TensorBoard scalars tasks/<task>/<metric> (`task_eval`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Optional

# Under torchrun every rank runs lm-eval's progress bars; only rank 0's are wanted. tqdm reads
# TQDM_* overrides once, when it is first imported (by torch below), so this must come first.
if os.environ.get("RANK", "0") != "0":
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torch.distributed as dist

from megalm import rundir
from megalm.config import ConfigError, expand_shard_paths
from megalm.data.builder import split_document_ranges
from megalm.data.indexed_dataset import IndexedDataset, ShardFormatError
from megalm.export.checkpoint_files import CheckpointError, CheckpointRef, list_checkpoints, locate_checkpoint
from megalm.export.consolidate import model_config_of
from megalm.parallel.cross_entropy import perplexity
from megalm.parallel.device import dist_backend, gather_objects, run_device, select_device
from megalm.parallel.grid import ProcessGrid, destroy_process_grid, is_grid_initialized
from megalm.training import launch_env

from .model_loading import load_stage
from .stages import stage_loss_sum
from .task_files import TaskSpecError
from .windows import ShardWindows, eval_windows


def _summary(loss_sum: float, tokens: int) -> dict:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "ppl": perplexity(loss), "tokens": tokens}


def evaluate_model(model: torch.nn.Module, windows: list[ShardWindows], micro_batch_size: int,
                   device: torch.device | str = "cpu", grid: Optional[ProcessGrid] = None) -> dict:
    """Token-weighted loss/perplexity over all shards, and per shard. `grid=None`: `model` is the whole
    model in this process; else it is this rank's part (`load_stage`) and every rank gets the totals."""
    device = torch.device(device)
    shards, all_sum, all_tokens = {}, 0.0, 0
    for sw in windows:
        s, n = stage_loss_sum(model, sw, micro_batch_size, device, grid)
        shards[sw.prefix] = _summary(s, n)
        all_sum, all_tokens = all_sum + s, all_tokens + n
    return {**_summary(all_sum, all_tokens), "shards": shards}


def _default_data(ref: CheckpointRef) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The run's own validation data: its data.valid_paths, or else the validation documents that
    data.split carves out of each train shard (exactly the documents training never saw)."""
    data = ref.run_config().data
    if data.valid_paths:
        return expand_shard_paths(data.valid_paths, "data.valid_paths"), {}
    ranges = {}
    for prefix in expand_shard_paths(data.train_paths, "data.train_paths"):
        start, end = split_document_ranges(len(IndexedDataset(prefix)), data.split)[1]
        if end > start:
            ranges[prefix] = (start, end)
    if not ranges:
        raise CheckpointError("--data: no shards given, the run config has no data.valid_paths and its "
                              "data.split leaves no validation documents; pass shard prefixes, e.g. --data data/valid/tokens")
    return list(ranges), ranges


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megalm-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN_DIR (or RUN_DIR/checkpoints/step_N)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    which.add_argument("--all-steps", action="store_true", help="evaluate every complete checkpoint")
    p.add_argument("--data", nargs="+", default=None, help="validation shard prefixes (PREFIX.bin/.idx), multi-shard prep outputs or globs")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N predicted tokens only")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's data.seq_len)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size under torchrun/srun (default 1)")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline stages under torchrun/srun (default 1); data-parallel size = world / (tp x pp)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: DeepSpeed's accelerator device)")
    p.add_argument("--output", default=None, help="also write all results to this JSON file")
    p.add_argument("--no-tensorboard", action="store_true")
    tasks = p.add_argument_group("task scoring (lm-evaluation-harness)")
    tasks.add_argument("--tasks", default=None,
                       help="comma-separated task names (shipped: megalm_larger, megalm_copy) or a directory of task YAMLs")
    tasks.add_argument("--limit", type=int, default=None, help="score the first N documents of each task only")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    tasks.add_argument("--tokenizer", default=None, help="tokenizer.json if the run's has moved (hash-checked)")
    tasks.add_argument("--log-samples", action="store_true", help="also record every request's responses")
    args = p.parse_args(argv)
    perplexity_only = [f for f in ("data", "max_tokens", "seq_len") if getattr(args, f) is not None]
    if args.tasks is not None and perplexity_only:
        p.error(f"--{perplexity_only[0].replace('_', '-')} applies to the perplexity eval, not to --tasks: drop one of them")
    task_only = [f for f in ("limit", "num_fewshot", "tokenizer") if getattr(args, f) is not None] + \
        (["log_samples"] if args.log_samples else [])
    if args.tp < 1 or args.pp < 1:
        p.error(f"--tp {args.tp} --pp {args.pp}: both must be >= 1")
    if args.tasks is not None and args.pp != 1:
        p.error(f"--pp {args.pp} applies to the perplexity eval; task scoring runs whole models (--tp, pp=1)")
    if args.tasks is None and task_only:
        p.error(f"--{task_only[0].replace('_', '-')} applies to --tasks only: add --tasks NAMES or drop it")
    return args


def setup_distributed(tp: int, pp: int = 1) -> Optional[ProcessGrid]:
    """The process grid (tp x pp x dp, dp = world / (tp x pp)) under torchrun, srun or mpirun
    (`megalm.training.launch_env`, as megalm-train maps them); None in a plain process. A layout the
    world cannot hold is refused before any process group starts."""
    launch = launch_env.discover()
    world = launch.world_size
    if world == 1 and not dist.is_initialized():
        if tp * pp != 1:
            flags = f"--tp {tp}" if pp == 1 else f"--tp {tp} --pp {pp}"
            raise CheckpointError(f"{flags} needs {tp * pp} processes: run under torchrun "
                                  f"--nproc_per_node={tp * pp} (or srun -n {tp * pp})")
        return None
    if world % (tp * pp) != 0:
        raise CheckpointError(f"--tp {tp} --pp {pp}: {world} processes cannot be split into tp x pp = {tp * pp} "
                              f"model-parallel groups; use a world size that is a multiple of {tp * pp}")
    from megalm.parallel.grid import get_process_grid, initialize_process_grid

    if is_grid_initialized():  # a caller (lm-eval's model, a test) already built one
        grid = get_process_grid()
        if (grid.tp, grid.pp) != (tp, pp):
            raise CheckpointError(f"--tp {tp} --pp {pp}: this process already runs in a tp={grid.tp} pp={grid.pp} grid")
        return grid
    launch_env.export(launch)
    if not dist.is_initialized():
        select_device(launch.local_rank)
        dist.init_process_group(dist_backend())
    return initialize_process_grid(tp, pp)


def check_eval_layout(ref: CheckpointRef, tp: int, pp: int) -> None:
    """Can the checkpoint's model be split over --tp/--pp? (Read from megalm.json: no process group yet.)"""
    try:
        model_config_of(ref.meta, ref.meta_path).check_layout(tp, pp, "model")
    except ConfigError as e:
        raise CheckpointError(f"--tp {tp} --pp {pp}: {ref.meta_path}: {e}") from None


def loss_scalars(r: dict) -> list[tuple[str, float]]:
    """TensorBoard points of one step's perplexity result."""
    return [("eval/loss", r["loss"]), ("eval/ppl", r["ppl"])] + \
        [(f"eval/{os.path.basename(prefix)}/loss", s["loss"]) for prefix, s in r["shards"].items()]


def write_results(run_dir: str, results: list[dict], tensorboard: bool,
                  result_file: Callable[[str, int], str] = rundir.eval_result_file,
                  scalars: Callable[[dict], list[tuple[str, float]]] = loss_scalars) -> None:
    """Each step's result as JSON (`result_file`: the perplexity eval's or the task eval's name) and
    its `scalars` as TensorBoard points at that step under RUN_DIR/eval/tensorboard."""
    os.makedirs(rundir.eval_dir(run_dir), exist_ok=True)
    for r in results:
        with open(result_file(run_dir, r["step"]), "w") as f:
            json.dump(r, f, indent=2)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=rundir.eval_tensorboard_dir(run_dir))
        for r in results:  # one point per checkpoint step
            for tag, value in scalars(r):
                writer.add_scalar(tag, value, r["step"])
        writer.close()


def run(args: argparse.Namespace) -> list[dict]:
    if args.tasks is not None:
        from .task_eval import run_tasks

        return run_tasks(args)
    steps: list[Optional[int]] = [args.step]
    if args.all_steps:
        steps = list_checkpoints(args.checkpoint)
        if not steps:
            locate_checkpoint(args.checkpoint)  # raises the "no complete checkpoint" error
    # Everything that can fail on the user's input (steps, layout, data) fails before the process group.
    plan = []
    for step in steps:
        ref = locate_checkpoint(args.checkpoint, step)
        check_eval_layout(ref, args.tp, args.pp)
        seq_len = args.seq_len or ref.run_config().data.seq_len
        prefixes, doc_ranges = (expand_shard_paths(args.data, "--data"), {}) if args.data else _default_data(ref)
        plan.append((ref, seq_len, eval_windows(prefixes, seq_len, args.max_tokens, doc_ranges)))
    owns_grid = not is_grid_initialized()
    grid = setup_distributed(args.tp, args.pp)
    try:
        results = _evaluate_steps(args, plan, grid)
    finally:
        if owns_grid and grid is not None:
            destroy_process_grid()
    if grid is None or grid.rank == 0:
        write_results(plan[-1][0].run_dir, results, not args.no_tensorboard)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(results, f, indent=2)
    return results


def _evaluate_steps(args: argparse.Namespace, plan: list, grid: Optional[ProcessGrid]) -> list[dict]:
    rank0 = grid is None or grid.rank == 0
    device = torch.device(args.device) if args.device else run_device()
    eval_layout = {"tp": args.tp, "pp": args.pp, "dp": 1 if grid is None else grid.dp}
    results = []
    for ref, seq_len, windows in plan:
        t0 = time.perf_counter()
        try:
            model, error = load_stage(ref, grid, device), None
        except CheckpointError as e:  # stages read different files: a peer must not wait for this one
            model, error = None, str(e)
        errors = [e for e in gather_objects(error) if e] if grid is not None else ([error] if error else [])
        if errors:
            raise CheckpointError(errors[0])
        r = evaluate_model(model, windows, args.micro_batch_size, device, grid)
        del model
        r.update(step=ref.step, checkpoint=ref.path, seq_len=seq_len, max_tokens=args.max_tokens,
                 layout=ref.meta.get("layout"), eval_layout=eval_layout, seconds=round(time.perf_counter() - t0, 3))
        results.append(r)
        if rank0:
            print(f"step {ref.step}: loss {r['loss']:.6f} | ppl {r['ppl']:.4f} | tokens {r['tokens']}", flush=True)
    return results


def _launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun, srun or mpirun), before any process group."""
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    owns_group = not dist.is_initialized()  # torchrun/srun: the group is started (and so ended) here
    try:
        run(args)
    except (CheckpointError, ShardFormatError, ConfigError, TaskSpecError) as e:
        if _launch_rank() == 0:  # every rank raises the same error; one reports it
            print(f"megalm-eval: {e}", file=sys.stderr)
        return 2
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
