"""`megalm-generate`: continue a prompt with a saved checkpoint, using the run's own tokenizer.

    megalm-generate --checkpoint RUN_DIR [--step N] --prompt TEXT [--max-new-tokens 64]
                    [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]

--temperature 0 is greedy decoding. The tokenizer is the run config's data.tokenizer (or --tokenizer);
its sha256 must match the one recorded in the checkpoint's megalm.json, so text is never decoded with
a tokenizer the model was not trained with. Runs without a tokenizer can be driven with
--prompt-ids "1 2 3" (token ids in, token ids out). One process, CPU or GPU; no KV cache (each new
token re-runs the context, fine for samples and tests, not for serving).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from data_prep.errors import PrepError
from data_prep.tokenizer import EOD_TOKEN, LoadedTokenizer, load_tokenizer
from megalm.parallel.device import run_device
from megalm.export.checkpoint_files import CheckpointError, CheckpointRef, locate_checkpoint

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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top-p; the rest -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_id: Optional[int] = None) -> list[int]:
    """Prompt ids -> the new ids (greedy when temperature == 0). The context is cut to max_seq_len."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    cfg = model.cfg
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-cfg.max_seq_len:]], dtype=torch.long, device=device)
        logits = model(context)[0, -1, : cfg.vocab_size].float().cpu()  # drop the -inf padding columns
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        ids.append(nxt)
        new.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
    return new


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megalm-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN_DIR (or RUN_DIR/checkpoints/step_N)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the run's tokenizer)")
    src.add_argument("--prompt-ids", help="prompt as space-separated token ids (runs without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = no nucleus filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json if the run's has moved (hash-checked)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--json", action="store_true", help="print a JSON record instead of the text")
    p.add_argument("--device", default=None, help="cpu or cuda (default: DeepSpeed's accelerator device)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        ref = locate_checkpoint(args.checkpoint, args.step)
        tok = run_tokenizer(ref, args.tokenizer)
        if args.prompt is not None and tok is None:
            raise CheckpointError(f"{ref.path}: the run has no data.tokenizer, so text cannot be encoded; "
                                  f"pass --tokenizer PATH or --prompt-ids \"1 2 3\"")
        prompt = (tok.tokenizer.encode(args.prompt).ids if args.prompt is not None
                  else [int(x) for x in args.prompt_ids.split()])
        device = torch.device(args.device) if args.device else run_device()
        model = load_model(ref, device=device)
        bad = [i for i in prompt if not 0 <= i < model.cfg.vocab_size]
        if bad:
            raise CheckpointError(f"prompt ids {bad[:5]} are outside the model's vocabulary [0, {model.cfg.vocab_size})")
        stop = None if args.no_stop or tok is None else tok.token_id(EOD_TOKEN)
        new = generate_ids(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                           args.seed, stop)
    except (CheckpointError, ValueError) as e:
        print(f"megalm-generate: {e}", file=sys.stderr)
        return 2
    text = tok.tokenizer.decode(new) if tok is not None else None
    if args.json:
        print(json.dumps({"step": ref.step, "prompt_ids": prompt, "ids": new, "text": text}))
    elif text is not None:
        print((args.prompt or "") + text)
    else:
        print(" ".join(map(str, new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
