"""`train.init_from`: a fresh run starts from a megalm run's (another layout) or a Hugging Face model's
weights, with its own optimizer, schedule and step counter; its first logged loss is the source model's
loss on that batch; megalm.json records the source; a different model shape or tokenizer is refused
listing every difference; `--resume auto` continues the fine-tune run itself, never the source."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from tests.harness import run_command
from tests.prep_fixtures import train_tiny_tokenizer
from tests.test_import_hf import make_hf_model
from tests.train_fixtures import TINY_RUN, train_on_rank, read_losses, read_metric, write_synthetic_shard

SOURCE = (2, 1, 1, 0)  # tp, pp, dp, zero of the pre-training run
TARGET = (1, 2, 1, 1)  # the fine-tune's layout
SOURCE_STEPS, FINE_TUNE_STEPS = 4, 3
RTOL = 1e-5


def _layout(tp: int, pp: int, dp: int, zero: int) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.zero_stage={zero}"]


def _run(rank_pool, layout, overrides: list[str], resume=None) -> None:
    world = layout[0] * layout[1] * layout[2]
    assert rank_pool(world).run(train_on_rank, _layout(*layout) + overrides, resume, timeout=600) == [0] * world


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {"shard": write_synthetic_shard(str(base / "tokens")),
            "tok": train_tiny_tokenizer(str(base / "tok.json"), vocab_size=400),
            "other_tok": train_tiny_tokenizer(str(base / "other.json"), vocab_size=300)}


def _common(data: dict, run_dir: str, steps: int) -> list[str]:
    return [f"data.train_paths=[{data['shard']}]", f"data.tokenizer={data['tok']}", f"train.run_dir={run_dir}",
            f"train.train_steps={steps}"]


@pytest.fixture(scope="module")
def source(rank_pool, data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("source") / "run")
    _run(rank_pool, SOURCE, _common(data, run_dir, SOURCE_STEPS))
    return run_dir


@pytest.fixture(scope="module")
def fine_tune(rank_pool, data, source, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("fine_tune") / "run")
    _run(rank_pool, TARGET, _common(data, run_dir, FINE_TUNE_STEPS) + [f"train.init_from={source}"])
    return run_dir


def _first_batch_loss(model, data: dict, steps: int) -> float:
    """Loss of `model` (logits for input ids) on the run's step-1 global batch, built as the trainer does."""
    from megalm.config.run import load_run_config
    from megalm.data import build_datasets, micro_batches_for_step
    from megalm.parallel.cross_entropy import IGNORE_INDEX

    cfg = load_run_config(TINY_RUN, _common(data, "unused", steps))
    train_ds, _, _ = build_datasets(cfg.data, train_samples=steps * cfg.train.global_batch_size, valid_samples=0,
                                    test_samples=0)
    [(ids, labels)] = micro_batches_for_step(train_ds, consumed_samples=0, micro_batch_size=cfg.train.global_batch_size,
                                             accumulation_steps=1, dp_rank=0, dp_size=1)
    with torch.no_grad():
        logits = model(ids)[..., : cfg.model.vocab_size].double()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX).item()


def _latest_meta(run_dir: str) -> dict:
    from megalm.export.checkpoint_files import locate_checkpoint

    return locate_checkpoint(run_dir).meta


def test_init_from_a_megalm_run_at_another_layout(source, fine_tune, data):
    from data_prep.tokenizer import file_sha256
    from megalm.config.run import load_run_config
    from megalm.eval.model_loading import load_model
    from megalm.export.checkpoint_files import locate_checkpoint
    from megalm.export.consolidate import consolidate
    from megalm.rundir import meta_file
    from megalm.training.schedule import lr_at

    losses = read_losses(fine_tune)
    assert sorted(losses) == list(range(1, FINE_TUNE_STEPS + 1)), losses  # the step counter restarted
    src_ref = locate_checkpoint(source)
    want = _first_batch_loss(load_model(src_ref), data, FINE_TUNE_STEPS)
    assert abs(losses[1] - want) <= RTOL * want, (losses[1], want)
    # not the fresh initialisation: the source run's own step 1 saw the same batch with the init weights
    assert losses[1] < read_losses(source)[1] - 0.05, (losses[1], read_losses(source)[1])

    # a fresh schedule (step 0's LR, not the source's step 4) and a fresh Adam (3 steps, not 4 + 3)
    cfg = load_run_config(TINY_RUN, _common(data, fine_tune, FINE_TUNE_STEPS))
    assert read_metric(fine_tune, "lr")[1] == pytest.approx(lr_at(1, cfg.train), rel=1e-9)
    meta = _latest_meta(fine_tune)
    assert meta["step"] == FINE_TUNE_STEPS and meta["consumed_samples"] == FINE_TUNE_STEPS * 8
    assert meta["layout"]["pp"] == 2 and meta["layout"]["tp"] == 1
    assert consolidate(locate_checkpoint(fine_tune), with_optimizer=True).adam_step == FINE_TUNE_STEPS
    assert meta["init_from"] == {"path": src_ref.path, "format": "megalm", "step": SOURCE_STEPS,
                                 "sha256": file_sha256(meta_file(src_ref.path))}


def test_resume_auto_continues_the_fine_tune_not_the_source(rank_pool, source, fine_tune, data, tmp_path):
    from megalm.export.checkpoint_files import list_checkpoints

    # the same fine-tune uninterrupted, to 5 steps
    straight = str(tmp_path / "straight")
    _run(rank_pool, TARGET, _common(data, straight, 5) + [f"train.init_from={source}"])
    # the 3-step fine-tune (stopped normally, checkpoint at 3) resumed to 5 with --resume auto
    resumed = str(tmp_path / "resumed")
    shutil.copytree(fine_tune, resumed)
    _run(rank_pool, TARGET, _common(data, resumed, 5) + [f"train.init_from={source}"], resume="auto")
    got, want = read_losses(resumed), read_losses(straight)
    assert sorted(got) == [1, 2, 3, 4, 5] and [got[s] for s in (4, 5)] == [want[s] for s in (4, 5)], (got, want)
    assert list_checkpoints(resumed)[-1] == 5 and list_checkpoints(source) == [SOURCE_STEPS]
    assert _latest_meta(resumed)["init_from"] == _latest_meta(fine_tune)["init_from"]  # carried over


def test_init_from_refuses_another_model_shape_or_tokenizer(source, data, tmp_path):
    run_dir = str(tmp_path / "run")
    res = run_command([sys.executable, "-m", "megalm.train", "--config", TINY_RUN,
                       f"data.train_paths=[{data['shard']}]", f"data.tokenizer={data['other_tok']}",
                       f"train.run_dir={run_dir}", f"train.init_from={source}",
                       "model.hidden_size=32", "model.num_layers=2", "model.rope_theta=500000"],
                      timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.output[-3000:]
    assert "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("megalm-train:")]) == 1, res.output
    for line in ("model.hidden_size: source 64 vs this run 32", "model.num_layers: source 4 vs this run 2",
                 "model.rope_theta: source 10000.0 vs this run 500000.0", "data.tokenizer (sha256): source '"):
        assert f"\n  {line}" in res.output, (line, res.output[-3000:])
    assert "model.vocab_size" not in res.output  # only what differs
    assert read_losses(run_dir) == {} and not os.path.isdir(os.path.join(run_dir, "checkpoints"))


def test_init_from_checks_hf_sources_and_paths_before_anything_runs(source, data, tmp_path):
    """The checks that run before any dataset or engine (init_from.prepare), on an HF source and bad paths."""
    from megalm.config import ConfigError
    from megalm.config.run import load_run_config
    from megalm.rundir import CheckpointError
    from megalm.training import init_from
    from megalm.training.loop import file_sha256

    hf_dir = make_hf_model(str(tmp_path / "hf"), tied=True, tokenizer=data["other_tok"])

    def prepare(path: str, run_dir: str = str(tmp_path / "run")):
        cfg = load_run_config(TINY_RUN, _common(data, run_dir, 2) + [f"train.init_from={path}"])
        return init_from.prepare(cfg, None, file_sha256(cfg.data.tokenizer))

    with pytest.raises(CheckpointError) as e:
        prepare(hf_dir)
    lines = str(e.value).splitlines()
    assert lines[1:3] == ["  model.tie_embeddings: source True vs this run False",
                          f"  data.tokenizer (sha256): source {file_sha256(data['other_tok'])!r} vs this run "
                          f"{file_sha256(data['tok'])!r} ({data['tok']})"], lines
    with pytest.raises(ConfigError, match="train.init_from: .*nope does not exist"):
        prepare(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="is this run's own directory; continue it with --resume auto"):
        prepare(source, run_dir=source)
    with pytest.raises(CheckpointError, match="train.init_from: .*no complete checkpoint found"):
        os.makedirs(tmp_path / "empty")
        prepare(str(tmp_path / "empty"))
    assert prepare(source).step == SOURCE_STEPS


def test_init_from_a_hugging_face_directory(rank_pool, data, tmp_path):
    from data_prep.tokenizer import file_sha256
    from tests.test_import_hf import hf_model

    hf_dir = make_hf_model(str(tmp_path / "hf"), tied=False, seed=3, tokenizer=data["tok"])
    run_dir = str(tmp_path / "run")
    layout = (2, 1, 1, 0)
    _run(rank_pool, layout, _common(data, run_dir, 2) + [f"train.init_from={hf_dir}"])
    losses = read_losses(run_dir)
    assert sorted(losses) == [1, 2]
    want = _first_batch_loss(lambda ids: hf_model(hf_dir)(ids).logits, data, 2)
    assert abs(losses[1] - want) <= RTOL * want, (losses[1], want)
    assert _latest_meta(run_dir)["init_from"] == {"path": hf_dir, "format": "hf", "step": None,
                                                  "sha256": file_sha256(os.path.join(hf_dir, "config.json"))}


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


@pytest.mark.skipif(not _fp16_supported(), reason="DeepSpeed's CPU accelerator reports no fp16 on this CPU")
def test_init_from_survives_the_first_fp16_update_at_zero0(rank_pool, source, data, tmp_path):
    """fp16 at ZeRO-0 steps fp32 master copies DeepSpeed keeps apart from the model: unless they are
    refreshed after loading, the first update put the random initialisation back."""
    from megalm.export.checkpoint_files import locate_checkpoint
    from megalm.export.consolidate import consolidate

    run_dir = str(tmp_path / "run")
    _run(rank_pool, (1, 1, 2, 0), _common(data, run_dir, 2) + [f"train.init_from={source}", "train.precision=fp16",
                                                               "train.lr=1e-12", "train.min_lr=0"])
    assert read_metric(run_dir, "skipped_steps")[2] < 2  # at least one update was applied
    src = consolidate(locate_checkpoint(source)).weights
    got = consolidate(locate_checkpoint(run_dir)).weights
    for name, w in src.items():  # equal up to fp16 rounding (2^-11 relative); an lr of 1e-12 moves nothing
        diff = (got[name].float() - w).abs()
        outside = int((diff > 2 ** -10 * w.abs() + 1e-7).sum())
        assert outside == 0, (name, outside, diff.max().item())
