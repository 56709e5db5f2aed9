"""`megalm-eval`: loss, perplexity and token count of saved checkpoints on validation shards.

    megalm-eval --checkpoint RUN_DIR [--step N | --all-steps] [--data PREFIX ...] [--max-tokens N]
                [--seq-len S] [--micro-batch-size B] [--output results.json]

Any checkpoint layout is consolidated and evaluated in this process (CPU by default, the GPU when
there is one), or under `torchrun --nproc_per_node=K` with `--tp T` (TP over T ranks, windows split
over the K/T data-parallel ranks). Windows are contiguous and unshuffled (`megalm.eval.windows`), the
loss is the mean over every predicted token, so results do not depend on layout or batch size beyond
fp32 rounding. Results go to RUN_DIR/eval/step_NNNNNNNN.json and TensorBoard scalars under
RUN_DIR/eval/tensorboard (one point per checkpoint step: `--all-steps` draws the validation curve).
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
import torch.nn.functional as F

from megalm import rundir
from megalm.config import ConfigError, expand_shard_paths
from megalm.data.builder import split_document_ranges
from megalm.data.indexed_dataset import IndexedDataset, ShardFormatError
from megalm.export.checkpoint_files import CheckpointError, CheckpointRef, list_checkpoints, locate_checkpoint
from megalm.parallel.cross_entropy import IGNORE_INDEX, perplexity, vocab_parallel_cross_entropy
from megalm.parallel.device import dist_backend, reduce_scalars, run_device, select_device

from .model_loading import load_model
from .task_files import TaskSpecError
from .windows import ShardWindows, batches, eval_windows


@torch.no_grad()
def shard_loss_sum(model: torch.nn.Module, sw: ShardWindows, micro_batch_size: int, device: torch.device,
                   dp_rank: int = 0, dp: int = 1, dp_group=None) -> tuple[float, int]:
    """(sum of per-token cross-entropy, number of predicted tokens) over a shard's windows, summed
    over the DP group. Uses the vocab-parallel loss when the model is tensor-parallel."""
    tp_group = getattr(model, "tp_group", None)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for inputs, labels in batches(sw, micro_batch_size, dp_rank, dp):
        inputs, labels = inputs.to(device), labels.to(device)
        logits = model(inputs).float()
        if tp_group is None:
            per_token = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                        ignore_index=IGNORE_INDEX, reduction="none")
        else:
            per_token = vocab_parallel_cross_entropy(logits, labels, IGNORE_INDEX, tp_group)
        total += per_token.double().sum().cpu()
        count += int((labels != IGNORE_INDEX).sum())
    if dp > 1:
        t = reduce_scalars([total.item(), float(count)], "sum", dp_group)
        total, count = t[0], int(t[1].item())
    return float(total), count


def _summary(loss_sum: float, tokens: int) -> dict:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "ppl": perplexity(loss), "tokens": tokens}


def evaluate_model(model: torch.nn.Module, windows: list[ShardWindows], micro_batch_size: int,
                   device: torch.device | str = "cpu", dp_rank: int = 0, dp: int = 1, dp_group=None) -> dict:
    """Token-weighted loss/perplexity over all shards, and per shard."""
    device = torch.device(device)
    shards, all_sum, all_tokens = {}, 0.0, 0
    for sw in windows:
        s, n = shard_loss_sum(model, sw, micro_batch_size, device, dp_rank, dp, dp_group)
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
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size under torchrun (default 1)")
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
    if args.tasks is None and task_only:
        p.error(f"--{task_only[0].replace('_', '-')} applies to --tasks only: add --tasks NAMES or drop it")
    return args


def setup_distributed(tp: int):
    """The process grid (tp x 1 x dp) under torchrun; None in a plain process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if tp != 1:
            raise CheckpointError(f"--tp {tp} needs {tp} processes: run under torchrun --nproc_per_node={tp}")
        return None
    from megalm.parallel.grid import initialize_process_grid

    select_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(dist_backend())
    return initialize_process_grid(tp, 1)


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
    grid = setup_distributed(args.tp)
    rank0 = grid is None or grid.rank == 0
    device = torch.device(args.device) if args.device else run_device()
    steps: list[Optional[int]] = [args.step]
    if args.all_steps:
        steps = list_checkpoints(args.checkpoint)
        if not steps:
            locate_checkpoint(args.checkpoint)  # raises the "no complete checkpoint" error
    results = []
    for step in steps:
        ref = locate_checkpoint(args.checkpoint, step)
        seq_len = args.seq_len or ref.run_config().data.seq_len
        prefixes, doc_ranges = (expand_shard_paths(args.data, "--data"), {}) if args.data else _default_data(ref)
        windows = eval_windows(prefixes, seq_len, args.max_tokens, doc_ranges)
        t0 = time.perf_counter()
        model = load_model(ref, grid, device)
        dp_args = (grid.dp_rank, grid.dp, grid.dp_group) if grid is not None else (0, 1, None)
        r = evaluate_model(model, windows, args.micro_batch_size, device, *dp_args)
        r.update(step=ref.step, checkpoint=ref.path, seq_len=seq_len, max_tokens=args.max_tokens,
                 layout=ref.meta.get("layout"), seconds=round(time.perf_counter() - t0, 3))
        results.append(r)
        if rank0:
            print(f"step {ref.step}: loss {r['loss']:.6f} | ppl {r['ppl']:.4f} | tokens {r['tokens']}", flush=True)
    if rank0:
        write_results(locate_checkpoint(args.checkpoint, results[-1]["step"]).run_dir, results,
                      not args.no_tensorboard)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(results, f, indent=2)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ShardFormatError, ConfigError, TaskSpecError) as e:
        print(f"megalm-eval: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
