"""Issue 12 acceptance (evaluation at any layout): a (tp, pp, dp, ZeRO) = (2, 2, 2, 1) checkpoint evaluated
by `megalm-eval` under a process group at (tp, pp, dp) = (2, 2, 2) and (1, 2, 1) gives the single-process
result within 1e-5; no rank consolidates (consolidation is patched to raise) and each rank reads only
its own stage's parameters, one full tensor at a time; impossible layouts are one-line errors."""
from __future__ import annotations

import json
import math
import os

import pytest

from tests.train_fixtures import train_layout_run, write_synthetic_shard

SOURCE = (2, 2, 2, 1)  # tp, pp, dp, zero
STEPS = 2
RTOL = 1e-5
MAX_TOKENS = 32 * 13 + 5  # 14 windows, the last one partly padded: uneven over dp and micro-batches


class _Refused(AssertionError):
    pass


def _refuse(*args, **kwargs):
    raise _Refused("megalm-eval consolidated the checkpoint")


def _no_consolidation():
    """Patch consolidation to raise; returns the undo."""
    import megalm.export.consolidate as consolidate

    saved = consolidate.consolidate, consolidate._Reader.read
    consolidate.consolidate, consolidate._Reader.read = _refuse, _refuse

    def undo():
        consolidate.consolidate, consolidate._Reader.read = saved
    return undo


def _eval_on_rank(argv: list[str]) -> tuple[list[dict], dict[str, int]]:
    """On every rank of a pool: megalm-eval's run as torchrun would start it, with consolidation
    refused; returns the results and {name: numel} of every full tensor this rank assembled."""
    from megalm.eval import evaluate
    from megalm.export import shard_reader

    seen: dict[str, int] = {}
    full = shard_reader.ShardReader.full

    def recording_full(self, name):
        t = full(self, name)
        seen[name] = t.numel()
        return t

    undo = _no_consolidation()
    shard_reader.ShardReader.full = recording_full
    try:
        return evaluate.run(evaluate.parse_args(argv)), seen
    finally:
        shard_reader.ShardReader.full = full
        undo()


def _main_on_rank(argv: list[str]) -> int:
    from megalm.eval.evaluate import main

    return main(argv)


@pytest.fixture(scope="module")
def trained(rank_pool, tmp_path_factory):
    shard = write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))
    run_dir = str(tmp_path_factory.mktemp("src"))
    train_layout_run(rank_pool, SOURCE, shard, run_dir, STEPS, (f"train.save_interval={STEPS}",))
    return run_dir, shard


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    """The single-process megalm-eval result (loaded tensor by tensor as well: consolidation refused)."""
    from megalm.eval.evaluate import main

    run_dir, shard = trained
    out = str(tmp_path_factory.mktemp("ref") / "single.json")
    undo = _no_consolidation()
    try:
        assert main(["--checkpoint", run_dir, "--data", shard, "--max-tokens", str(MAX_TOKENS),
                     "--micro-batch-size", "4", "--no-tensorboard", "--output", out]) == 0
    finally:
        undo()
    return json.load(open(out))[0]


def test_single_process_reader_equals_consolidation(trained, reference):
    from megalm.eval.evaluate import evaluate_model
    from megalm.eval.model_loading import load_model, model_from_state
    from megalm.eval.windows import eval_windows
    from megalm.export.checkpoint_files import locate_checkpoint
    from megalm.export.consolidate import consolidate

    run_dir, shard = trained
    ref = locate_checkpoint(run_dir)
    assert ref.meta["layout"]["pp"] == 2 and reference["tokens"] == MAX_TOKENS
    consolidated = model_from_state(consolidate(ref)).state_dict()
    for name, t in load_model(ref).state_dict().items():
        assert (t == consolidated[name]).all(), name
    old = evaluate_model(model_from_state(consolidate(ref)), eval_windows([shard], 32, MAX_TOKENS), 4)
    assert old["loss"] == reference["loss"]


def _stage_names(tp: int, pp: int, pp_rank: int) -> set[str]:
    from megalm.config.model import load_model_config
    from megalm.eval.stages import stage_blocks
    from megalm.export.full_weights import expected_shapes

    cfg = load_model_config("tiny")
    blocks = {f"layers.{i}." for i in stage_blocks(cfg.num_layers, pp, pp_rank)}
    names = {n for n in expected_shapes(cfg) if any(n.startswith(b) for b in blocks)}
    if pp_rank == 0:
        names.add("embedding.weight")
    if pp_rank == pp - 1:
        names |= {"final_norm.weight", "output.weight"}
    return names


@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 2, 1)], ids=["tp2-pp2-dp2", "tp1-pp2-dp1"])
def test_eval_at_any_layout_equals_single_process(rank_pool, trained, reference, tmp_path, layout):
    from megalm.config.model import load_model_config
    from megalm.export.full_weights import expected_shapes

    run_dir, shard = trained
    tp, pp, dp = layout
    out = str(tmp_path / "multi.json")
    argv = ["--checkpoint", run_dir, "--data", shard, "--max-tokens", str(MAX_TOKENS), "--micro-batch-size", "3",
            "--no-tensorboard", "--output", out, "--tp", str(tp), "--pp", str(pp)]
    per_rank = rank_pool(tp * pp * dp).run(_eval_on_rank, argv, timeout=300)
    written = json.load(open(out))[0]  # rank 0's file
    assert written["eval_layout"] == {"tp": tp, "pp": pp, "dp": dp}
    for rank, (results, seen) in enumerate(per_rank):
        r = results[0]
        assert r["tokens"] == reference["tokens"] == written["tokens"]
        rel = abs(r["loss"] - reference["loss"]) / reference["loss"]
        assert rel <= RTOL, (rank, r["loss"], reference["loss"], rel)
        assert r["loss"] == written["loss"]  # every rank holds the world's totals
        # no consolidation: this rank assembled its own stage's parameters only, one full tensor each
        pp_rank = rank // (tp * dp)
        assert set(seen) == _stage_names(tp, pp, pp_rank), (rank, sorted(seen))
        assert max(seen.values()) <= max(math.prod(s) for s in expected_shapes(load_model_config("tiny")).values())
    print(f"layout {layout}: loss {written['loss']!r} vs single {reference['loss']!r}, "
          f"relative difference {abs(written['loss'] - reference['loss']) / reference['loss']:.2e}")


def test_impossible_layouts_are_one_line_errors(rank_pool, trained, capsys):
    from megalm.eval.evaluate import main

    run_dir, shard = trained
    common = ["--checkpoint", run_dir, "--data", shard, "--max-tokens", "64", "--no-tensorboard"]
    assert main([*common, "--pp", "5"]) == 2  # 4 layers: checked from megalm.json before any process group
    err = capsys.readouterr().err
    assert err.startswith("megalm-eval: --tp 1 --pp 5: ") and "num_layers" in err and err.count("\n") == 1, err
    assert main([*common, "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megalm-eval: --tp 3 --pp 1: ") and "num_heads" in err, err
    assert main([*common, "--pp", "2"]) == 2
    assert "--tp 1 --pp 2 needs 2 processes" in capsys.readouterr().err
    # world 2 cannot hold tp x pp = 4: every rank refuses before building a grid
    assert rank_pool(2).run(_main_on_rank, [*common, "--tp", "2", "--pp", "2"], timeout=120) == [2, 2]
    assert os.path.isdir(run_dir)


# ------------------------------------------------------------------ a ZeRO-3 x PP checkpoint (issue 11)

ZERO3_PIPELINE_SOURCE = (2, 2, 2, 3)  # one DeepSpeedEngine per stage: per-mp-rank ZeRO-3 partitions


@pytest.fixture(scope="module")
def zero3_pipeline_trained(rank_pool, trained, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("src-z3pp"))
    train_layout_run(rank_pool, ZERO3_PIPELINE_SOURCE, trained[1], run_dir, STEPS, (f"train.save_interval={STEPS}",))
    return run_dir


def test_zero3_pipeline_checkpoint_evaluates_at_any_layout(rank_pool, trained, reference, zero3_pipeline_trained,
                                                            tmp_path):
    """Evaluated single-process and at (tp, pp, dp) = (1, 2, 1), without consolidation: both agree within
    1e-5, and (the same training at another layout) agree with the ZeRO-1 source's result within 1e-4."""
    from megalm.eval.evaluate import main
    from megalm.export.checkpoint_files import locate_checkpoint

    run_dir, shard = zero3_pipeline_trained, trained[1]
    layout = locate_checkpoint(run_dir).meta["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"], layout["zero_stage"]) == ZERO3_PIPELINE_SOURCE, layout
    common = ["--checkpoint", run_dir, "--data", shard, "--max-tokens", str(MAX_TOKENS), "--no-tensorboard"]
    single_out = str(tmp_path / "single.json")
    undo = _no_consolidation()
    try:
        assert main([*common, "--micro-batch-size", "4", "--output", single_out]) == 0
    finally:
        undo()
    single = json.load(open(single_out))[0]
    out = str(tmp_path / "multi.json")
    per_rank = rank_pool(2).run(_eval_on_rank, [*common, "--micro-batch-size", "3", "--output", out, "--pp", "2"],
                                timeout=300)
    for rank, (results, seen) in enumerate(per_rank):
        assert results[0]["tokens"] == single["tokens"] == MAX_TOKENS
        assert abs(results[0]["loss"] - single["loss"]) / single["loss"] <= RTOL, (rank, results[0], single)
        assert set(seen) == _stage_names(1, 2, rank), (rank, sorted(seen))
    same_training = abs(single["loss"] - reference["loss"]) / reference["loss"]
    assert same_training <= 1e-4, (single["loss"], reference["loss"])
    print(f"ZeRO-3 x PP checkpoint: single {single['loss']!r}, (1,2,1) {per_rank[0][0][0]['loss']!r}, "
          f"ZeRO-1 source {reference['loss']!r} ({same_training:.1e})")
