"""`megalm-eval --tasks NAMES|DIR`: lm-evaluation-harness tasks over one or every checkpoint step.

Each step's GPTModel is scored through the registered `megalm` lm-eval model (`lm_eval_model`), in
this process or under torchrun with --tp; tasks run offline (HF_DATASETS_OFFLINE=1; which names and
directories are accepted: `task_files`). Results go where the perplexity eval's go, through the same
writer (`evaluate.write_results`): RUN_DIR/eval/tasks_step_NNNNNNNN.json per step ({task: {metric:
value}}, plus each request's responses with --log-samples) and TensorBoard scalars
`tasks/<task>/<metric>` at the checkpoint's step under RUN_DIR/eval/tensorboard, so `--all-steps`
draws each task's accuracy across checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any, Optional

from megalm import rundir
from megalm.export.checkpoint_files import list_checkpoints, locate_checkpoint

from .task_files import resolve_tasks

# lm-eval metric keys are "metric,filter"; "none" is the filter of tasks that declare none
_NO_FILTER = "none"


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of simple_evaluate's results ("acc,none" -> "acc", "acc,f" -> "acc/f");
    non-numeric entries (aliases, "N/A" stderrs) are left out."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[metric if filter_name == _NO_FILTER else f"{metric}/{filter_name}"] = float(value)
        out[task] = metrics
    return out


def task_scalars(record: dict) -> list[tuple[str, float]]:
    """TensorBoard points of one step's record: `tasks/<task>/<metric>` (standard errors stay in the JSON)."""
    return [(f"tasks/{task}/{metric}", value) for task, metrics in record["tasks"].items()
            for metric, value in metrics.items() if "_stderr" not in metric]


def _plain(obj: Any) -> Any:
    """JSON-ready copy (tuples -> lists, numpy scalars and other objects -> numbers or strings)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _samples(results: dict) -> dict[str, list[dict]]:
    keep = ("doc_id", "target", "arguments", "resps", "filtered_resps")
    return {task: [_plain({k: s.get(k) for k in keep} | {m: s.get(m) for m in s.get("metrics", [])}) for s in rows]
            for task, rows in results.get("samples", {}).items()}


def score_tasks(lm, tasks: list, task_manager, limit: Optional[int] = None, num_fewshot: Optional[int] = None,
                log_samples: bool = False) -> Optional[dict]:
    """lm-eval's simple_evaluate of `tasks` with `lm` (any lm-eval LM), offline; its results dict on
    the rank that reports (None elsewhere)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # datasets reads this when it is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                           num_fewshot=num_fewshot, log_samples=log_samples)


def step_record(results: dict, ref, seconds: float, log_samples: bool) -> dict:
    record = {"step": ref.step, "checkpoint": ref.path, "layout": ref.meta.get("layout"),
              "tasks": task_metrics(results),
              "n_samples": {t: n.get("effective") for t, n in results.get("n-samples", {}).items()},
              "seconds": round(seconds, 3)}
    if log_samples:
        record["samples"] = _samples(results)
    return record


def _summary_line(record: dict) -> str:
    parts = [f"{task} " + " ".join(f"{m} {v:.4f}" for m, v in metrics.items() if "_stderr" not in m)
             for task, metrics in record["tasks"].items()]
    return f"step {record['step']}: " + " | ".join(parts)


def run_tasks(args: argparse.Namespace) -> list[dict]:
    """Score args.tasks on the chosen steps; rank 0 prints a line per step and writes the results."""
    from .evaluate import setup_distributed, write_results
    from .lm_eval_model import MegalmLM

    specs, manager = resolve_tasks(args.tasks)  # a bad task name fails before any model is loaded
    steps: list[Optional[int]] = [args.step]
    if args.all_steps:
        steps = list(list_checkpoints(args.checkpoint))
        if not steps:
            locate_checkpoint(args.checkpoint)  # raises the "no complete checkpoint" error
    refs = [locate_checkpoint(args.checkpoint, s) for s in steps]
    grid = setup_distributed(args.tp)
    rank0 = grid is None or grid.rank == 0
    if not rank0:  # lm-eval logs per process; the reporting rank speaks for all
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    records = []
    for ref in refs:
        t0 = time.perf_counter()
        lm = MegalmLM(checkpoint=args.checkpoint, step=ref.step, tokenizer=args.tokenizer,
                      batch_size=args.micro_batch_size, device=args.device, grid=grid)
        results = score_tasks(lm, specs, manager, args.limit, args.num_fewshot, args.log_samples)
        if rank0 and results is not None:
            records.append(step_record(results, ref, time.perf_counter() - t0, args.log_samples))
            print(_summary_line(records[-1]), flush=True)
        del lm
    if rank0:
        write_results(refs[-1].run_dir, records, not args.no_tensorboard, rundir.eval_tasks_result_file, task_scalars)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(records, f, indent=2)
    return records
