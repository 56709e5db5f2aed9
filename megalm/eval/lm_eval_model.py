"""`megalm`, an lm-evaluation-harness model over any megalm checkpoint.

    lm_eval.simple_evaluate(model="megalm", model_args="checkpoint=RUN_DIR,step=4,batch_size=16", ...)

(the module must be imported first: importing it registers the name). model_args: checkpoint (RUN_DIR
or a step directory), step (default: latest), tokenizer (default: the run's data.tokenizer, hash-checked
against megalm.json), batch_size, max_gen_toks (default 256, as lm-eval's hf model), device, tp.

The numbers are meant to equal lm-eval's `hf` model on the `megalm-export` of the same checkpoint, so
its rules are followed exactly: a (context, continuation) pair is split by encoding context and
context+continuation and taking the difference (`TemplateLM._encode_pair`, trailing context spaces
moved into the continuation); the end-of-text token prefixes an empty context and each rolling window;
inputs longer than the model's max_seq_len are cut from the left; generation is greedy (with the KV cache),
stops at any `until` string or the end-of-text token and truncates at the first stop string.

Parallelism: under torchrun with tp=T every rank holds a TP shard and computes every request (logits
are all-gathered over the TP group, so every rank sees the same numbers and takes the same greedy
steps); with world > T the data-parallel ranks split the requests through lm-eval's own rank /
world_size protocol. lm-eval builds results on dp rank 0; only global rank 0 prints progress.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F

import lm_eval.models  # noqa: F401 - lm-eval's registry imports its own models only while empty: fill it before adding ours
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from data_prep.tokenizer import EOD_TOKEN, LoadedTokenizer
from megalm.export.checkpoint_files import CheckpointError, CheckpointRef, locate_checkpoint
from megalm.parallel.device import all_ranks, gather_objects, run_device
from megalm.parallel.grid import ProcessGrid

from .decode import full_vocab, generate_batch
from .generate import run_tokenizer
from .model_loading import load_model
from .task_files import TaskSpecError

# (request key, context ids, continuation ids) - the shape TemplateLM hands to _loglikelihood_tokens
TokenRequest = tuple[Optional[tuple[str, str]], list[int], list[int]]


def _right_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Rows padded on the right: the model is causal, so a row's logits never see its padding."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _process_grid(tp: int) -> Optional[ProcessGrid]:
    """The process grid this process runs in: the current one, one set up here under torchrun, or None."""
    from megalm.parallel.grid import get_process_grid, is_grid_initialized

    if is_grid_initialized():
        return get_process_grid()
    from .evaluate import setup_distributed

    return setup_distributed(tp)


@register_model("megalm")
class MegalmLM(TemplateLM):
    """One checkpoint's GPTModel and the run's tokenizer behind lm-eval's LM interface."""

    def __init__(self, checkpoint: str, step: Optional[int] = None, tokenizer: Optional[str] = None,
                 batch_size: int | str = 8, max_gen_toks: int = 256, device: Optional[str] = None, tp: int = 1,
                 grid: Optional[ProcessGrid] = None, max_batch_size: Any = None, **unknown: Any):
        super().__init__()  # max_batch_size: lm-eval passes it along with batch_size; batches here are fixed
        if unknown:
            raise CheckpointError(f"megalm model_args: unknown key(s) {', '.join(sorted(unknown))}; known: checkpoint, "
                                  f"step, tokenizer, batch_size, max_gen_toks, device, tp")
        self.ref: CheckpointRef = locate_checkpoint(str(checkpoint), None if step in (None, "") else int(step))
        tok = run_tokenizer(self.ref, tokenizer)
        if tok is None:
            raise CheckpointError(f"{self.ref.path}: the run has no data.tokenizer, so task text cannot be encoded; "
                                  f"pass tokenizer=PATH in model_args (--tokenizer PATH to megalm-eval)")
        eot = tok.token_id(EOD_TOKEN)
        if eot is None:
            raise CheckpointError(f"tokenizer {tok.path}: has no {EOD_TOKEN} token, which lm-eval needs as the "
                                  f"end-of-text and empty-context token; use a tokenizer trained with it")
        self.loaded_tokenizer: LoadedTokenizer = tok
        self._eot_id = eot
        self.grid = grid if grid is not None else _process_grid(int(tp))
        self._device = torch.device(device) if device else run_device()
        self.model = load_model(self.ref, self.grid, self._device)
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        if self.grid is not None and self.grid.dp > 1:  # DP ranks split the requests (lm-eval's protocol)
            self._rank, self._world_size = self.grid.dp_rank, self.grid.dp
        self._show_progress = self.grid is None or self.grid.rank == 0

    # ---------------------------------------------------------------------------------- properties
    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.loaded_tokenizer.path.replace("/", "__")

    # ------------------------------------------------------------------- lm-eval's rank protocol
    def _dp_group(self):
        return self.grid.dp_group if self.grid is not None else None

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        parts = [torch.as_tensor(p) for p in gather_objects(tensor.detach().cpu(), self._dp_group())]
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list[Any]]:
        if self.world_size <= 1:
            return [obj]
        gathered = gather_objects(obj, self._dp_group())
        return gathered if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            all_ranks(True, self._dp_group())

    # -------------------------------------------------------------------------------- tokenizing
    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len: Optional[int] = None,
                   **kwargs: Any) -> list[int]:
        ids = self.loaded_tokenizer.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.loaded_tokenizer.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------- scoring
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self._show_progress)

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation) per
        request. Longest first, so a batch pads little; results come back in request order."""
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self._show_progress, desc="megalm loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            inputs = []
            for i in batch:
                _, context, continuation = requests[i]
                if not continuation or len(continuation) > self.max_length:
                    raise TaskSpecError(f"a continuation of {len(continuation)} tokens cannot be scored: it must have "
                                     f"1 to max_seq_len={self.max_length} tokens")
                inputs.append((context + continuation)[-(self.max_length + 1):][:-1])  # cut from the left
            with torch.no_grad():
                logits = full_vocab(self.model, self.model(_right_padded(inputs, self._eot_id, self._device)))
            log_probs = F.log_softmax(logits, dim=-1)
            for row, i in enumerate(batch):
                key, _, continuation = requests[i]
                end = len(inputs[row])
                scored = log_probs[row, end - len(continuation):end]  # the positions that predict the continuation
                target = torch.tensor(continuation, device=scored.device)
                answer = (float(scored.gather(-1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, in disjoint max_seq_len windows (lm-eval's rolling windows:
        the end-of-text token before the first, every token predicted once, each window with full context)."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for n, (string,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                       max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----------------------------------------------------------------------------- generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations; requests with the same generation kwargs are batched together."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self._show_progress, desc="megalm generate_until")
        for members in groups.values():
            gen_kwargs = dict(requests[members[0]].args[1])
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise TaskSpecError(f"generation_kwargs {gen_kwargs}: the megalm model decodes greedily only; "
                                 f"set do_sample: false in the task")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self._eot_id], False))
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise TaskSpecError(f"generation_kwargs max_gen_toks={max_new} must be below the model's "
                                 f"max_seq_len={self.max_length}; lower it in the task")
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] or [self._eot_id]
                            for i in batch]
                for i, text in zip(batch, self._greedy(contexts, max_new, until)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        bar.close()
        return out

    def _greedy(self, contexts: list[list[int]], max_new: int, until: list[str]) -> list[str]:
        """Greedy decoding of a batch with the KV cache (`megalm.eval.decode.generate_batch`: the rows
        left-padded, each generating what it would alone). A row stops at the end-of-text token (not
        part of its text) or once its text contains a stop string; the text is cut at the first one."""
        def reached_stop(row: int, ids: list[int]) -> bool:
            return any(stop and stop in self.tok_decode(ids) for stop in until)

        news = generate_batch(self.model, contexts, max_new, stop_id=self._eot_id, stop_when=reached_stop)
        return [postprocess_generated_text(self.tok_decode(ids[:-1] if ids and ids[-1] == self._eot_id else ids),
                                           until, None) for ids in news]

    def get_model_info(self) -> dict:
        return {"checkpoint": self.ref.path, "step": self.ref.step, "tokenizer": self.loaded_tokenizer.path,
                "tokenizer_sha256": self.loaded_tokenizer.sha256, "layout": self.ref.meta.get("layout")}
