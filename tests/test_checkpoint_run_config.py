"""Checkpoint tools rebuild the typed RunConfig from megalm.json through training's own parsing:
same defaults, same validation, and an error that names the checkpoint's file."""
from __future__ import annotations

import copy
import os

import pytest

from megalm.config import ConfigError
from megalm.config.data import DataConfig
from megalm.config.run import RunConfig, run_config_from_dict
from megalm.export.checkpoint_files import CheckpointRef


def _meta() -> dict:
    cfg = run_config_from_dict({"model": "tiny", "data": {"train_paths": ["data/train/tokens"], "seq_len": 64},
                                "parallel": {"tp": 2, "pp": 2, "zero_stage": 1}})
    return {"step": 4, "config": cfg.to_dict(), "model": cfg.to_dict()["model"]}


def test_round_trip_gives_the_training_config():
    meta = _meta()
    cfg = RunConfig.from_checkpoint_meta(meta, "run/checkpoints/step_00000004/megalm.json")
    assert cfg.to_dict() == meta["config"]
    assert cfg.data.seq_len == 64 and cfg.parallel.tp == 2 and cfg.model.num_layers == 4


def test_absent_fields_take_the_config_classes_defaults():
    meta = _meta()
    del meta["config"]["data"]["split"], meta["config"]["train"]["no_decay_embeddings"]
    cfg = RunConfig.from_checkpoint_meta(meta, "megalm.json")
    assert cfg.data.split == DataConfig().split  # the one default, not a copy in the tool
    assert cfg.train.no_decay_embeddings is True


@pytest.mark.parametrize("damage, field", [
    (lambda c: c["train"].update(lr="fast"), "train.lr"),
    (lambda c: c["data"].update(spilt="80,20,0"), "data.spilt"),
    (lambda c: c["parallel"].update(tp=3), "model"),  # 8 heads do not split over 3 TP ranks
    (lambda c: c.pop("data"), "data"),
], ids=["type", "unknown-field", "layout", "missing-section"])
def test_bad_config_names_the_checkpoint_file_and_the_field(damage, field):
    meta = _meta()
    damage(meta["config"])
    ref = CheckpointRef(root=os.path.join("run", "checkpoints"), tag="step_00000004", meta=copy.deepcopy(meta))
    with pytest.raises(ConfigError) as e:
        ref.run_config()
    msg = str(e.value)
    assert msg.startswith(os.path.join("run", "checkpoints", "step_00000004", "megalm.json") + ": "), msg
    assert f"{field}" in msg and "not a valid run config" in msg, msg


def test_metadata_without_a_config_is_refused():
    with pytest.raises(ConfigError, match=r"^x/megalm.json: no 'config' mapping"):
        RunConfig.from_checkpoint_meta({"step": 1, "model": {}}, "x/megalm.json")
