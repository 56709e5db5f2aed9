"""`train.deepspeed_config`: keys the run config owns are refused unless they agree (the error names both
fields), tuning keys pass through into the generated DeepSpeed config, and `megalm-train` refuses a
conflict before any process group starts."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

from megalm.config import ConfigError
from megalm.config.deepspeed_overrides import check_deepspeed_overrides, owned_keys
from megalm.config.run import RunConfig, run_config_from_dict
from tests.harness import free_port, run_command
from tests.train_fixtures import TINY_RUN, write_synthetic_shard


def _cfg(deepspeed_config=None, zero_stage: int | None = None, precision: str = "fp32", **train) -> RunConfig:
    if zero_stage is None:  # bf16 needs ZeRO >= 1 (RunConfig.validate); the other precisions default to 0
        zero_stage = 1 if precision == "bf16" else 0
    train = {"micro_batch_size": 2, "global_batch_size": 8, "grad_clip": 1.0, "precision": precision, **train}
    if deepspeed_config is not None:
        train["deepspeed_config"] = deepspeed_config
    return run_config_from_dict({"model": "tiny", "data": {"train_paths": ["unused"], "seq_len": 32},
                                 "parallel": {"zero_stage": zero_stage}, "train": train})


def _check(cfg: RunConfig, dp: int = 1) -> dict:
    return check_deepspeed_overrides(cfg.train, cfg.parallel.zero_stage, dp)


# (DeepSpeed path, user dict, run config, dp, message): each names the DeepSpeed key and the run-config field.
CONFLICTS = [
    (("zero_optimization", "stage"), {"zero_optimization": {"stage": 2}}, dict(zero_stage=3), 1,
     "train.deepspeed_config.zero_optimization.stage=2 conflicts with parallel.zero_stage=3: "
     "set parallel.zero_stage instead"),
    (("train_batch_size",), {"train_batch_size": 16}, {}, 1,
     "train.deepspeed_config.train_batch_size=16 conflicts with train.global_batch_size=8: "
     "set train.global_batch_size instead"),
    (("train_micro_batch_size_per_gpu",), {"train_micro_batch_size_per_gpu": 4}, {}, 1,
     "train.deepspeed_config.train_micro_batch_size_per_gpu=4 conflicts with train.micro_batch_size=2: "
     "set train.micro_batch_size instead"),
    (("gradient_accumulation_steps",), {"gradient_accumulation_steps": 4}, {}, 2,
     "train.deepspeed_config.gradient_accumulation_steps=4 conflicts with train.global_batch_size / "
     "(train.micro_batch_size x dp) = 8 / (2 x 2) = 2: set train.global_batch_size or train.micro_batch_size"),
    (("gradient_clipping",), {"gradient_clipping": 0.5}, dict(zero_stage=1), 1,
     "train.deepspeed_config.gradient_clipping=0.5 conflicts with train.grad_clip=1.0: set train.grad_clip"),
    (("bf16", "enabled"), {"bf16": {"enabled": True}}, {}, 1,
     "train.deepspeed_config.bf16.enabled=true conflicts with train.precision=fp32: set train.precision instead"),
    (("bfloat16", "enabled"), {"bfloat16": {"enabled": True}}, dict(precision="fp16"), 1,
     "train.deepspeed_config.bfloat16.enabled=true conflicts with train.precision=fp16"),
    (("fp16", "enabled"), {"fp16": {"enabled": True}}, dict(precision="bf16"), 1,
     "train.deepspeed_config.fp16.enabled=true conflicts with train.precision=bf16"),
    (("torch_autocast", "enabled"), {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, {}, 1,
     "train.deepspeed_config.torch_autocast.enabled=true conflicts with train.precision=fp32"),
    (("data_types", "grad_accum_dtype"), {"data_types": {"grad_accum_dtype": "bf16"}}, dict(precision="bf16"), 1,
     'train.deepspeed_config.data_types.grad_accum_dtype="bf16" conflicts with train.precision=bf16'),
    (("optimizer",), {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, {}, 1,
     'train.deepspeed_config.optimizer={"params": {"lr": 0.001}, "type": "Adam"} conflicts with train.lr, '
     "train.adam_beta1"),
    (("scheduler",), {"scheduler": {"type": "WarmupLR"}}, {}, 1,
     "train.deepspeed_config.scheduler=" '{"type": "WarmupLR"} conflicts with train.lr, train.min_lr, '
     "train.warmup_steps"),
]


@pytest.mark.parametrize("path,user,run,dp,message", CONFLICTS, ids=[".".join(c[0]) for c in CONFLICTS])
def test_owned_key_conflict_names_both_fields(path, user, run, dp, message):
    with pytest.raises(ConfigError) as e:
        _check(_cfg(user, **run), dp)
    assert message in str(e.value)


def test_every_owned_key_has_a_conflict_case():
    # A key added to the owned list without a test here would be refused untested.
    assert {k.path for k in owned_keys(_cfg().train, 0, 1)} == {c[0] for c in CONFLICTS}


@pytest.mark.parametrize("user,run,message", [
    ({"bf16": {"enabled": False}}, dict(precision="bf16"), "bf16.enabled=false conflicts with train.precision=bf16"),
    ({"data_types": {"grad_accum_dtype": "fp32"}}, {},
     'grad_accum_dtype="fp32" conflicts with train.precision=fp32 (which leaves it unset)'),
    ({"fp16": {"enabled": 1}}, dict(precision="fp16"), "fp16.enabled=1 conflicts"),  # 1 is not true
    ({"zero_optimization": 3}, {}, "train.deepspeed_config.zero_optimization: expected a mapping of DeepSpeed fields"),
])
def test_other_disagreements(user, run, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _check(_cfg(user, **run))


def test_all_conflicts_reported_together():
    with pytest.raises(ConfigError) as e:
        _check(_cfg({"train_batch_size": 4, "zero_optimization": {"stage": 1}}))
    assert "train_batch_size=4 conflicts" in str(e.value) and "zero_optimization.stage=1 conflicts" in str(e.value)


def test_agreeing_values_are_accepted_and_the_generated_value_stands():
    from megalm.training.deepspeed_config import build_deepspeed_config

    # fp32 ZeRO-0: GuardedAdamW clips, DeepSpeed's gradient_clipping is generated as 0.0; the user's 1.0
    # agrees with train.grad_clip and must not turn on DeepSpeed's own (silent) clipping as well.
    agreeing = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "bf16": {"enabled": False},
                "fp16": {"enabled": False}, "torch_autocast": {"enabled": False}}
    generated = build_deepspeed_config(_cfg(), dp=2)
    final = build_deepspeed_config(_cfg(agreeing), dp=2)
    assert final["gradient_clipping"] == generated["gradient_clipping"] == 0.0
    assert {k: final[k] for k in generated} == generated
    assert not final.get("bf16", {}).get("enabled") and not final.get("fp16", {}).get("enabled")
    bf16 = _cfg({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}, precision="bf16")
    assert build_deepspeed_config(bf16, dp=1) == build_deepspeed_config(_cfg(precision="bf16"), dp=1)


def test_tuning_keys_pass_through():
    from megalm.training.deepspeed_config import build_deepspeed_config

    tuning = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 1_000_000,
                                    "stage3_max_live_parameters": 100_000_000, "stage3_prefetch_bucket_size": 50_000},
              "fp16": {"loss_scale_window": 500}, "steps_per_print": 5, "wall_clock_breakdown": True}
    ds = build_deepspeed_config(_cfg(tuning, zero_stage=3, precision="fp16"), dp=1)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["contiguous_gradients"] is True  # generated keys kept
    assert (zero["overlap_comm"], zero["reduce_bucket_size"], zero["stage3_max_live_parameters"],
            zero["stage3_prefetch_bucket_size"]) == (True, 1_000_000, 100_000_000, 50_000)
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale_window"] == 500
    assert ds["fp16"]["initial_scale_power"] == 16
    assert ds["steps_per_print"] == 5 and ds["wall_clock_breakdown"] is True


PRECISION_STAGES = [(p, z) for p in ("fp32", "bf16", "fp16") for z in (0, 1, 2, 3) if (p, z) != ("bf16", 0)]


@pytest.mark.parametrize("precision,zero_stage", PRECISION_STAGES)
def test_owned_values_match_the_generator(precision, zero_stage):
    """The owned list restates what the generator writes; if the two drift, agreeing values stop agreeing."""
    from megalm.training.deepspeed_config import build_deepspeed_config
    from megalm.training.optimizer import uses_guarded_optimizer

    cfg = _cfg(zero_stage=zero_stage, precision=precision)
    ds = build_deepspeed_config(cfg, dp=2)
    absent = object()
    for key in owned_keys(cfg.train, zero_stage, 2):
        node = ds
        for part in ("bf16", "enabled") if key.path == ("bfloat16", "enabled") else key.path:  # DeepSpeed's alias
            node = node.get(part, absent) if isinstance(node, dict) else absent
        if key.path == ("gradient_clipping",) and uses_guarded_optimizer(cfg.train, zero_stage):
            assert node == 0.0
        elif node is not absent:  # generated: must be the agreeing value
            assert node == key.expected, key.path
        elif key.path[-1] == "enabled":  # not generated: DeepSpeed's default (off) is what agrees
            assert key.expected is False, key.path
        else:  # not generated and nothing agrees (grad_accum_dtype outside bf16, optimizer, scheduler)
            assert not isinstance(key.expected, (bool, int, float, str)), key.path


def test_inline_mapping_from_an_override(tmp_path):
    from megalm.config.run import load_run_config

    cfg = load_run_config(TINY_RUN, ["train.deepspeed_config={zero_optimization: {stage: 3}}", "parallel.zero_stage=3"])
    assert cfg.train.deepspeed_config == {"zero_optimization": {"stage": 3}}
    assert _check(cfg) == {"zero_optimization": {}}


def test_json_file_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True}}))
    with pytest.raises(ConfigError, match=rf"zero_optimization.stage=1 conflicts with parallel.zero_stage=0: set "
                                          rf"parallel.zero_stage instead \(or remove it from {path}\)"):
        _check(_cfg(str(path)))
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="train.deepspeed_config: .* must hold a JSON object"):
        _check(_cfg(str(path)))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="train.deepspeed_config: .* is not valid JSON"):
        _check(_cfg(str(path)))
    with pytest.raises(ConfigError, match="train.deepspeed_config: file .*missing.json' does not exist"):
        _check(_cfg(str(tmp_path / "missing.json")))


def test_megalm_train_refuses_a_conflict_before_any_process_group(tmp_path):
    shard = write_synthetic_shard(str(tmp_path / "shard" / "tokens"))
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    # World size 2 with no second rank: reaching init_process_group would hang until the timeout.
    env = {"OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    train = os.path.join(os.path.dirname(sys.executable), "megalm-train")
    args = ["--config", TINY_RUN, f"data.train_paths=[{shard}]", f"train.run_dir={tmp_path / 'run'}",
            f"train.deepspeed_config={ds_json}", "parallel.zero_stage=1"]
    res = run_command([train, *args], timeout=60, env=env)
    assert res.returncode == 2, res.output
    assert ("megalm-train: config error: train.deepspeed_config.zero_optimization.stage=2 conflicts with "
            "parallel.zero_stage=1: set parallel.zero_stage instead") in res.output, res.output
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.parametrize("zero", [0, 1])
def test_grad_reduction_per_step_below_zero2_is_refused_naming_the_field(zero):
    from megalm.config.run import load_run_config

    with pytest.raises(ConfigError, match=rf"parallel.grad_reduction: per_step applies to zero_stage 2 and 3 "
                                          rf"\(ZeRO {zero} reduces once per step already\)"):
        load_run_config(TINY_RUN, ["parallel.grad_reduction=per_step", f"parallel.zero_stage={zero}"])
    cfg = load_run_config(TINY_RUN, ["parallel.grad_reduction=per_step", "parallel.zero_stage=2"])
    assert cfg.parallel.reduces_gradients_per_step and not cfg.parallel.holds_parameters_per_step
