"""`megalm-generate`: continue prompts with a saved checkpoint, using the run's own tokenizer.

    megalm-generate --checkpoint RUN_DIR [--step N] --prompt TEXT [--prompt TEXT ...] [--max-new-tokens 64]
                    [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--no-kv-cache] [--json]
    megalm-generate --checkpoint RUN_DIR --prompts-file prompts.jsonl     # {"prompt": ...} or {"prompt_ids": [...]}
    torchrun --nproc_per_node=2 -m megalm.eval.generate --checkpoint RUN_DIR --prompt TEXT [--tp 2]

--temperature 0 is greedy decoding. The tokenizer is the run config's data.tokenizer (or --tokenizer);
its sha256 must match the one recorded in the checkpoint's megalm.json, so text is never decoded with
a tokenizer the model was not trained with. Runs without a tokenizer can be driven with
--prompt-ids "1 2 3" (token ids in, token ids out). Several prompts run as one batch.

Generation keeps a KV cache (`megalm.eval.decode`): the prompts, left-padded, are prefilled in one
forward, then each step runs one token per row; greedy output is the same as re-running the whole
context each step (`--no-kv-cache`, the reference path) and as Hugging Face `generate` on the
`megalm-export` of the checkpoint. Sampling with --seed draws the same tokens either way (prompt i
uses seed + i). CPU or GPU, one process or under torchrun with TP (any tp, whatever the checkpoint's
layout): every rank computes, rank 0 prints.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch
import torch.distributed as dist

from data_prep.errors import PrepError
from data_prep.tokenizer import EOD_TOKEN, LoadedTokenizer, load_tokenizer
from megalm.export.checkpoint_files import CheckpointError, CheckpointRef, locate_checkpoint
from megalm.parallel.device import run_device
from megalm.parallel.grid import ProcessGrid, destroy_process_grid, get_process_grid, is_grid_initialized
from megalm.training.launch_env import discover

from .decode import filter_logits, full_vocab, generate_batch, generate_ids  # noqa: F401 - the public API
from .model_loading import load_model


def run_tokenizer(ref: CheckpointRef, override: Optional[str] = None) -> Optional[LoadedTokenizer]:
    """The tokenizer the run trained with, checked against megalm.json's tokenizer_sha256."""
    path = override or ref.run_config().data.tokenizer
    if not path:
        return None
    try:
        tok = load_tokenizer(path)
    except PrepError as e:
        raise CheckpointError(f"{e} (the run's data.tokenizer; pass --tokenizer PATH if it moved)") from None
    want = ref.meta.get("tokenizer_sha256")
    if want and tok.sha256 != want:
        raise CheckpointError(f"tokenizer {path}: sha256 {tok.sha256[:12]}... differs from the {want[:12]}... recorded "
                              f"in {ref.meta_path}; this is not the tokenizer the model was trained with. "
                              f"Pass the original file with --tokenizer PATH")
    return tok


def read_prompts_file(path: str) -> list[str | list[int]]:
    """--prompts-file: JSON Lines, one {"prompt": TEXT} or {"prompt_ids": [ids]} per line (blank lines skipped)."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise CheckpointError(f"--prompts-file {path}: {e.strerror}; pass an existing JSONL file") from None
    prompts: list[str | list[int]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"--prompts-file {path}:{n}: not JSON ({e.msg}); each line must be "
                                  f'{{"prompt": "text"}} or {{"prompt_ids": [1, 2, 3]}}') from None
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            prompts.append(rec["prompt"])
        elif (isinstance(rec, dict) and isinstance(rec.get("prompt_ids"), list)
              and all(isinstance(i, int) and not isinstance(i, bool) for i in rec["prompt_ids"])):
            prompts.append(list(rec["prompt_ids"]))
        else:
            raise CheckpointError(f"--prompts-file {path}:{n}: expected {{\"prompt\": \"text\"}} or "
                                  f"{{\"prompt_ids\": [1, 2, 3]}}, got {line[:60]!r}")
    if not prompts:
        raise CheckpointError(f"--prompts-file {path}: no prompts; write one JSON object per line")
    return prompts


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megalm-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN_DIR (or RUN_DIR/checkpoints/step_N)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (encoded with the run's tokenizer); repeat for a batch")
    src.add_argument("--prompt-ids", action="append",
                     help="prompt as space-separated token ids (runs without a tokenizer); repeat for a batch")
    src.add_argument("--prompts-file", help='JSONL, one {"prompt": TEXT} or {"prompt_ids": [ids]} per line: one batch')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = no nucleus filter")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i of a batch uses seed + i)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json if the run's has moved (hash-checked)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="re-run the whole context for every new token (the reference path; slow)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size under torchrun (default: the number of processes)")
    p.add_argument("--json", action="store_true", help="print a JSON record per prompt instead of the text")
    p.add_argument("--device", default=None, help="cpu or cuda (default: DeepSpeed's accelerator device)")
    return p.parse_args(argv)


def process_grid(tp: Optional[int], world_size: int) -> Optional[ProcessGrid]:
    """The current process grid, else one built here under torchrun/srun/mpirun (tp x 1 x dp; default tp:
    the number of processes), else None (one process)."""
    if is_grid_initialized():
        return get_process_grid()
    from .evaluate import setup_distributed  # deferred: its imports are only needed here

    return setup_distributed(world_size if tp is None else tp)


def read_prompts(args: argparse.Namespace, tok: Optional[LoadedTokenizer], where: str) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, "" for an id prompt; prompts as token ids) from --prompt, --prompt-ids or --prompts-file."""
    raw: list[str | list[int]]
    if args.prompts_file is not None:
        raw = read_prompts_file(args.prompts_file)
    elif args.prompt is not None:
        raw = list(args.prompt)
    else:
        try:
            raw = [[int(x) for x in ids.split()] for ids in args.prompt_ids]
        except ValueError:
            raise CheckpointError(f"--prompt-ids {args.prompt_ids}: expected space-separated integers, "
                                  f"e.g. --prompt-ids \"1 2 3\"") from None
    if any(isinstance(r, str) for r in raw) and tok is None:
        raise CheckpointError(f"{where}: the run has no data.tokenizer, so text cannot be encoded; "
                              f"pass --tokenizer PATH or --prompt-ids \"1 2 3\"")
    texts = [r if isinstance(r, str) else "" for r in raw]
    return texts, [tok.tokenizer.encode(r).ids if isinstance(r, str) else r for r in raw]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    owns_group = not dist.is_initialized()  # torchrun: the group is started (and so ended) here
    launch = discover()
    rank0 = launch.rank == 0
    try:
        ref = locate_checkpoint(args.checkpoint, args.step)
        tok = run_tokenizer(ref, args.tokenizer)
        texts, prompts = read_prompts(args, tok, ref.path)
        grid = process_grid(args.tp, launch.world_size)
        rank0 = grid is None or grid.rank == 0
        device = torch.device(args.device) if args.device else run_device()
        model = load_model(ref, grid, device=device)
        bad = [i for p in prompts for i in p if not 0 <= i < model.cfg.vocab_size]
        if bad:
            raise CheckpointError(f"prompt ids {bad[:5]} are outside the model's vocabulary [0, {model.cfg.vocab_size})")
        stop = None if args.no_stop or tok is None else tok.token_id(EOD_TOKEN)
        news = generate_batch(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              args.seed, stop, kv_cache=not args.no_kv_cache)
    except (CheckpointError, ValueError) as e:
        if rank0:
            print(f"megalm-generate: {e}", file=sys.stderr)
        return 2
    finally:
        if owns_group and dist.is_initialized():
            destroy_process_grid()
            dist.destroy_process_group()
    if rank0:
        for n, (text, prompt, new) in enumerate(zip(texts, prompts, news)):
            decoded = tok.tokenizer.decode(new) if tok is not None else None
            if args.json:
                print(json.dumps({"step": ref.step, "prompt_ids": prompt, "ids": new, "text": decoded}))
            elif decoded is not None:
                print(("\n" if n else "") + text + decoded)  # a blank line between the prompts' texts
            else:
                print(" ".join(map(str, new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
