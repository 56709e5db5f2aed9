"""Issue 6 acceptance: checkpoints saved at (tp, pp, dp, ZeRO) = (2, 2, 2, 1) and (2, 1, 2, 3) evaluate
in one CPU process to the loss their own training layout computes on the same windows; `megalm-eval
--all-steps` writes one TensorBoard point per checkpoint step; missing steps, another model's shape and
a truncated shard file give clear errors."""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from tests.train_fixtures import TINY_RUN, train_on_rank, write_synthetic_shard

STEPS, SAVE_EVERY = 4, 2
SEQ_LEN, MBS = 32, 2
EVAL_TOKENS = SEQ_LEN * 16  # 16 full windows: 4 engine eval steps of 2 micro-batches x 2 windows
RTOL = 1e-5


def _overrides(shard: str, run_dir: str, tp: int, pp: int, zero: int) -> list[str]:
    return [f"data.train_paths=[{shard}]", f"train.run_dir={run_dir}", f"train.train_steps={STEPS}",
            f"train.save_interval={SAVE_EVERY}", f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"parallel.zero_stage={zero}"]


def _eval_in_training_layout(overrides: list[str], shard: str) -> float:
    """On every rank: build the training layout's engine, load the latest checkpoint with the training
    code's loader, and average engine.eval_step over the evaluation windows (every DP rank gets the same
    windows, so the DP mean is the same number)."""
    import deepspeed
    import torch.distributed as dist

    from megalm.config.run import load_run_config
    from megalm.eval.windows import eval_windows
    from megalm.parallel.grid import destroy_process_grid, initialize_process_grid
    from megalm.training import checkpoint as ckpt
    from megalm.training.engine import build_engine
    from megalm.training.loop import checkpoint_meta

    cfg = load_run_config(TINY_RUN, overrides)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    grid = initialize_process_grid(cfg.parallel.tp, cfg.parallel.pp)
    try:
        engine = build_engine(cfg, grid)
        state = ckpt.load_checkpoint(engine.ds, cfg.train.run_dir, None, checkpoint_meta(cfg, engine, dist.get_world_size()))
        assert state is not None and state.step == STEPS
        sw = eval_windows([shard], SEQ_LEN, EVAL_TOKENS)[0]
        accum = cfg.train.gradient_accumulation_steps(grid.dp)
        per_step = accum * MBS
        losses = []
        for start in range(0, sw.inputs.shape[0], per_step):
            mbs = [(sw.inputs[i:i + MBS], sw.labels[i:i + MBS]) for i in range(start, start + per_step, MBS)]
            losses.append(engine.eval_step(mbs))
        return sum(losses) / len(losses)
    finally:
        destroy_process_grid()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))


LAYOUTS = [(2, 2, 2, 1), (2, 1, 2, 3)]  # (tp, pp, dp, zero)


@pytest.fixture(scope="module")
def trained(rank_pool, shard, tmp_path_factory):
    """run_dir per layout, trained STEPS steps with checkpoints at 2 and 4."""
    runs = {}
    for tp, pp, dp, zero in LAYOUTS:
        run_dir = str(tmp_path_factory.mktemp(f"tp{tp}pp{pp}dp{dp}z{zero}"))
        overrides = _overrides(shard, run_dir, tp, pp, zero)
        assert rank_pool(tp * pp * dp).run(train_on_rank, overrides, timeout=600) == [0] * (tp * pp * dp)
        runs[(tp, pp, dp, zero)] = (run_dir, overrides)
    return runs


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}-z{z}" for t, p, d, z in LAYOUTS])
def test_single_process_eval_matches_training_layout(rank_pool, shard, trained, layout):
    from megalm.eval.evaluate import evaluate_model
    from megalm.eval.model_loading import load_model
    from megalm.eval.windows import eval_windows
    from megalm.export.checkpoint_files import locate_checkpoint

    run_dir, overrides = trained[layout]
    tp, pp, dp, _ = layout
    in_layout = rank_pool(tp * pp * dp).run(_eval_in_training_layout, overrides, shard, timeout=600)
    assert max(in_layout) - min(in_layout) <= 1e-6 * abs(in_layout[0]), in_layout  # every rank agrees
    ref = locate_checkpoint(run_dir)
    assert ref.step == STEPS and ref.meta["layout"]["tp"] == tp
    single = evaluate_model(load_model(ref), eval_windows([shard], SEQ_LEN, EVAL_TOKENS), micro_batch_size=3)
    assert single["tokens"] == EVAL_TOKENS
    assert abs(single["loss"] - in_layout[0]) <= RTOL * abs(in_layout[0]), (single["loss"], in_layout[0])


def test_all_steps_writes_one_tensorboard_point_per_step(trained, shard, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megalm.eval.evaluate import main

    run_dir, _ = trained[LAYOUTS[0]]
    out = str(tmp_path / "results.json")
    assert main(["--checkpoint", run_dir, "--all-steps", "--data", shard, "--max-tokens", "256",
                 "--output", out]) == 0
    results = json.load(open(out))
    assert [r["step"] for r in results] == [2, 4]
    assert all(r["tokens"] == 256 and r["ppl"] > 1 for r in results)
    assert results[1]["loss"] < results[0]["loss"]  # training helped
    assert sorted(os.listdir(os.path.join(run_dir, "eval"))) == ["step_00000002.json", "step_00000004.json", "tensorboard"]
    acc = EventAccumulator(os.path.join(run_dir, "eval", "tensorboard"))
    acc.Reload()
    points = acc.Scalars("eval/loss")
    assert [p.step for p in points] == [2, 4]
    assert [p.value for p in points] == pytest.approx([r["loss"] for r in results])


def test_torchrun_eval_with_tensor_parallel_matches_single_process(trained, shard, tmp_path):
    import sys

    from tests.harness import free_port, run_command

    run_dir, _ = trained[LAYOUTS[0]]
    common = ["--checkpoint", run_dir, "--data", shard, "--max-tokens", "300", "--no-tensorboard"]
    single, multi = str(tmp_path / "single.json"), str(tmp_path / "multi.json")
    run_command([sys.executable, "-m", "megalm.eval.evaluate", *common, "--output", single], timeout=300, check=True)
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                 f"--master_port={free_port()}", "-m", "megalm.eval.evaluate", *common, "--tp", "2",
                 "--output", multi], timeout=300, env={"OMP_NUM_THREADS": "1"}, check=True)
    a, b = json.load(open(single))[0], json.load(open(multi))[0]
    assert a["tokens"] == b["tokens"] == 300
    assert abs(a["loss"] - b["loss"]) <= RTOL * a["loss"]


def test_missing_step_lists_available_steps(trained, shard, capsys):
    from megalm.eval.evaluate import main

    run_dir, _ = trained[LAYOUTS[0]]
    assert main(["--checkpoint", run_dir, "--step", "999", "--data", shard]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint for step 999" in err and "available steps: 2, 4" in err


def _copy_step(run_dir: str, dst: str) -> str:
    shutil.copytree(os.path.join(run_dir, "checkpoints"), os.path.join(dst, "checkpoints"))
    return dst


@pytest.mark.parametrize("layout", LAYOUTS, ids=["pipeline", "zero3"])
def test_truncated_shard_file_is_named(trained, shard, tmp_path, capsys, layout):
    from megalm.eval.evaluate import main

    run_dir = _copy_step(trained[layout][0], str(tmp_path / "run"))
    pattern = "layer_02-model_01-*.pt" if layout[1] > 1 else "zero_pp_rank_1_mp_rank_01_optim_states.pt"
    victim = glob.glob(os.path.join(run_dir, "checkpoints", "step_00000004", pattern))[0]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    assert main(["--checkpoint", run_dir, "--data", shard, "--max-tokens", "64", "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert victim in err and "truncated or corrupt" in err, err


def test_checkpoint_of_another_model_shape_is_refused(trained, tmp_path):
    from megalm.config import to_dict
    from megalm.config.model import load_model_config
    from megalm.eval.model_loading import model_from_state
    from megalm.export.checkpoint_files import CheckpointError, locate_checkpoint
    from megalm.export.consolidate import consolidate
    from megalm.export.full_weights import load_full_weights
    from megalm.model import GPTModel

    # 1. shard files from one model under a megalm.json describing another
    run_dir = _copy_step(trained[LAYOUTS[0]][0], str(tmp_path / "run"))
    meta_path = os.path.join(run_dir, "checkpoints", "step_00000004", "megalm.json")
    meta = json.load(open(meta_path))
    meta["model"]["ffn_hidden_size"] = 192
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CheckpointError) as e:
        consolidate(locate_checkpoint(run_dir))
    msg = str(e.value)
    assert "layers.0.mlp.gate_proj.weight: shape (128, 64) but the model needs (192, 64)" in msg
    assert "layer_01-model_00-model_states.pt" in msg and "another model" in msg

    # 2. good weights loaded into a model of another shape
    state = consolidate(locate_checkpoint(trained[LAYOUTS[1]][0]))
    other = load_model_config("tiny")
    other.num_layers = 2
    with pytest.raises(CheckpointError, match=r"layers\.2\.attention_norm\.weight: not a parameter of this model"):
        load_full_weights(GPTModel(other), state.weights, other)
    assert model_from_state(state).cfg == state.cfg
    assert to_dict(state.cfg)["num_layers"] == 4
