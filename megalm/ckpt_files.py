"""Which files one saved step must hold, and whether they are readable: the one definition.

Used before every resume (rank 0, so that all ranks raise the same error instead of one rank's
DeepSpeed loader asserting while its peers wait in a collective), by `megalm-launch ckpt verify`, and
by the tools. Standard library and safetensors' own reader only: the launcher imports it and must stay
torch-free.

torch saves zip archives; a readable one has a central directory (its last bytes) and, when checked
fully, members whose CRCs match. The quick check reads only each file's tail.
"""
from __future__ import annotations

import os
import zipfile
from typing import Optional

from safetensors import safe_open

from megalm import rundir


def model_states_name(mp_rank: int, zero_stage: int, dp_rank: int = 0) -> str:
    """DeepSpeed's engine-state file of model-parallel rank `mp_rank` (= pp_rank * tp + tp_rank): one per
    data-parallel rank under ZeRO-3 (which keeps only placeholders of the weights there), else one."""
    if zero_stage >= 3:
        return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_model_states.pt"
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def stage_engine_layout(pp: int, zero_stage: int) -> bool:
    """True where each pipeline stage trains as its own DeepSpeedEngine (pp > 1 with ZeRO-2/3:
    megalm.training.stage_engine) instead of in DeepSpeed's PipelineEngine (pp > 1, ZeRO 0/1). Such a
    step holds pp=1's files once per model-parallel rank, with PipelineModule names under `pipe.`."""
    return pp > 1 and zero_stage >= 2


def layer_states_name(layer_index: int, tp_rank: int) -> str:
    """DeepSpeed's file of one pipeline layer's state dict at one TP rank (pp>1 checkpoints)."""
    return f"layer_{layer_index:02d}-model_{tp_rank:02d}-model_states.pt"


def optim_states_name(dp_rank: int, mp_rank: int) -> str:
    """DeepSpeed's ZeRO optimizer partition of one data-parallel rank of model-parallel rank `mp_rank`."""
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


# A layout-free ("universal") step, as `megalm-reshard` writes it (DESIGN decision 48): one safetensors
# file per kind of tensor ("weight", "exp_avg", "exp_avg_sq") holding every parameter's full fp32 tensor
# under its GPTModel name, and one .pt with the Adam step count, the LR schedule and the engine counters.
# megalm.json's layout says {"universal": [the kinds stored], tp, pp, dp, zero_stage, world_size}, the
# numbers being the layout it was made for; any layout resumes it.
UNIVERSAL_STATE_FILE = "universal_state.pt"


def universal_tensor_file(kind: str) -> str:
    """The safetensors file of one kind of tensor ("weight", "exp_avg", "exp_avg_sq") in a universal step."""
    return f"universal_{kind}.safetensors"


def universal_kinds(layout: Optional[dict]) -> tuple[str, ...]:
    """The kinds of tensor a universal step holds; () for a step DeepSpeed saved at its layout."""
    return tuple((layout or {}).get("universal") or ())


def expected_rank_files(layout: dict) -> list[str]:
    """File names (relative to the step directory) that must exist for a layout (megalm.json's
    `layout`): one rng file per rank, and DeepSpeed's model-state files (one per data-parallel rank ×
    model-parallel rank under ZeRO-3, else one per model-parallel rank = pipeline stage × TP rank)."""
    if universal_kinds(layout):
        return [universal_tensor_file(k) for k in universal_kinds(layout)] + [UNIVERSAL_STATE_FILE]
    tp, pp, dp = int(layout["tp"]), int(layout["pp"]), int(layout["dp"])
    zero, world = int(layout.get("zero_stage", 0)), int(layout["world_size"])
    exact = [rundir.rng_relpath(r) for r in range(world)]
    if zero >= 3:
        exact += [model_states_name(m, zero, d) for d in range(dp) for m in range(tp * pp)]
    else:
        exact += [model_states_name(m, 0) for m in range(tp * pp)]
    return exact


def zip_problem(path: str, quick: bool) -> Optional[str]:
    """Why the torch archive at `path` cannot be read, or None when it can."""
    try:
        with zipfile.ZipFile(path) as zf:
            if not zf.namelist():
                return "empty archive"
            bad = None if quick else zf.testzip()
            if bad is not None:
                return f"CRC mismatch in member {bad}"
    except zipfile.BadZipFile:
        return "truncated zip: no central directory"
    except (OSError, EOFError) as e:
        return f"cannot read it: {getattr(e, 'strerror', None) or e}"
    return None


def safetensors_problem(path: str) -> Optional[str]:
    """Why the safetensors file at `path` cannot be read, or None. The safetensors library checks, on
    open, that the header parses and that its tensors cover the file exactly, so a truncated copy fails
    here, before any rank maps it. (The numpy framework keeps this import torch-free for the launcher.)"""
    try:
        with safe_open(path, framework="numpy"):
            pass
    except OSError as e:
        return f"cannot read it: {getattr(e, 'strerror', None) or e}"
    except Exception as e:  # safetensors raises its own SafetensorError for a bad or truncated file
        return f"truncated or damaged, the safetensors reader says: {e}"
    return None


def file_problem(path: str, quick: bool) -> Optional[str]:
    """Why a checkpoint file (.pt or .safetensors) cannot be read, or None."""
    return safetensors_problem(path) if path.endswith(".safetensors") else zip_problem(path, quick)


def first_problem(ckpt_dir: str, layout: Optional[dict], quick: bool) -> Optional[tuple[str, str]]:
    """(path, why) of the first missing or unreadable file of a step directory, or None. `layout`
    (megalm.json's) names the files that must exist; without it only the present `.pt` files are read."""
    if layout is not None:
        for rel in expected_rank_files(layout):
            path = os.path.join(ckpt_dir, rel)
            if not os.path.isfile(path):
                return path, "missing (the save did not write it, or it was deleted)"
    for path in pt_files(ckpt_dir):
        why = file_problem(path, quick)
        if why is not None:
            return path, why
    return None


def pt_files(ckpt_dir: str) -> list[str]:
    """Every `.pt` and `.safetensors` under a step directory, in a stable order."""
    found = []
    for dirpath, _, names in sorted(os.walk(ckpt_dir)):
        found += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith((".pt", ".safetensors"))]
    return found
