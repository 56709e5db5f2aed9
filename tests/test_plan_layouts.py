"""megalm-plan: the enumeration rules (the config validation's), the ranking and the command line."""
from __future__ import annotations

import dataclasses

import pytest

from megalm.config.model import load_model_config
from megalm.plan.cli import main, plan
from megalm.plan.cost import estimate_step_time
from megalm.plan.layouts import Layout, enumerate_layouts, layout_problem
from megalm.plan.memory import GIB, Hardware, estimate_memory, stage_parameters


def test_every_enumerated_layout_obeys_the_rules():
    cfg = load_model_config("7b")
    layouts = list(enumerate_layouts(cfg, 64, 1024))
    assert layouts and len(set(layouts)) == len(layouts)
    for L in layouts:
        assert L.gpus == 64 and L.tp <= 8
        assert cfg.num_heads % L.tp == 0 and cfg.kv_heads % L.tp == 0 and cfg.num_layers >= L.pp
        assert L.pipeline_reshard == "per_step" or (L.zero == 3 and L.pp > 1)  # the mode exists only there
        assert 1024 % (L.micro_batch * L.dp) == 0
    assert {L.tp for L in layouts} == {1, 2, 4, 8}
    assert any(L.checkpointing for L in layouts) and any(not L.checkpointing for L in layouts)


def test_rules_reject_what_config_validation_rejects():
    cfg = load_model_config("tiny")  # 8 heads, 4 kv heads, 4 layers
    assert "kv heads" in layout_problem(cfg, Layout(8, 1, 1, 0, 1, False), 8)
    assert "layers" in layout_problem(cfg, Layout(1, 8, 1, 0, 1, False), 8)
    # ZeRO-2/3 x PP is a valid layout (issue 11), planned under both gathering modes; fp16 under it is not
    assert layout_problem(cfg, Layout(1, 2, 2, 3, 1, False), 8) is None
    assert "fp16 cannot be combined" in layout_problem(cfg, Layout(1, 2, 2, 3, 1, False), 8, precision="fp16")
    piped = {(L.zero, L.pipeline_reshard) for L in enumerate_layouts(cfg, 4, 16) if L.pp > 1}
    assert piped == {(1, "per_step"), (2, "per_step"), (3, "per_step"), (3, "per_microbatch")}, piped
    assert "pipeline_reshard" in layout_problem(cfg, Layout(1, 2, 2, 3, 1, False, "sometimes"), 8)
    assert "divisible" in layout_problem(cfg, Layout(1, 1, 3, 0, 1, False), 8)
    assert "node" in layout_problem(cfg, Layout(16, 1, 1, 0, 1, False), 8, gpus_per_node=8)
    assert layout_problem(cfg, Layout(2, 2, 2, 1, 1, False), 8) is None
    # bf16 at ZeRO-0 is refused by the run config (DeepSpeed's bf16 optimizer is ZeRO-1): never planned.
    assert "bf16 needs parallel.zero_stage >= 1" in layout_problem(cfg, Layout(2, 2, 2, 0, 1, False), 8)
    assert layout_problem(cfg, Layout(2, 2, 2, 0, 1, False), 8, precision="fp32") is None
    assert all(L.zero >= 1 for L in enumerate_layouts(cfg, 4, 16))
    assert {L.zero for L in enumerate_layouts(cfg, 4, 16, precision="fp32") if L.dp == 1} == {0}
    assert {L.zero for L in enumerate_layouts(cfg, 4, 16) if L.dp == 1} == {1}
    # tp=8 is impossible for tiny (4 kv heads): never enumerated
    assert all(L.tp <= 4 for L in enumerate_layouts(cfg, 16, 16))


def test_memory_model_monotone_in_the_obvious_directions():
    cfg = load_model_config("7b")
    base = Layout(1, 1, 8, 0, 1, False)
    mem = lambda L: estimate_memory(cfg, L, 4096, 64, Hardware()).total  # noqa: E731
    assert mem(dataclasses.replace(base, zero=1)) < mem(base)
    assert mem(dataclasses.replace(base, zero=3)) < mem(dataclasses.replace(base, zero=2)) < mem(dataclasses.replace(base, zero=1)) + 4 * GIB
    assert mem(dataclasses.replace(base, checkpointing=True)) < mem(base)
    assert mem(dataclasses.replace(base, micro_batch=2)) > mem(base)
    assert sum(stage_parameters(cfg, 1, 4)) == sum(stage_parameters(cfg, 1, 1)) + 0  # untied: no extra copy
    assert sum(stage_parameters(cfg, 2, 1)) * 2 == pytest.approx(cfg.num_parameters(), rel=0.01)


def test_zero3_pipeline_terms():
    """ZeRO-3 x PP: per_step holds the stage's full gradients during the step but all-gathers once per
    step; per_microbatch the reverse. ZeRO-2 x PP has no PipelineEngine second bucket."""
    cfg = load_model_config("13b")
    step, micro = Layout(1, 4, 8, 3, 1, False), Layout(1, 4, 8, 3, 1, False, "per_microbatch")
    mem = lambda L: estimate_memory(cfg, L, 4096, 512, Hardware())  # noqa: E731
    P = max(stage_parameters(cfg, 1, 4))
    assert mem(step).grads - mem(micro).grads == pytest.approx(2 * P, rel=1e-5)  # bf16 full gradients (worst stage)
    cost = lambda L: estimate_step_time(cfg, L, 4096, 512, Hardware()).dp_comm  # noqa: E731
    m = step.micro_batches(512)
    assert cost(micro) == pytest.approx(cost(step) * 3 * m / 2)  # 2(D-1)/D P once vs 3m(D-1)/D P
    assert cost(step) == pytest.approx(cost(dataclasses.replace(step, zero=1)))
    # ZeRO-2 reduce-scatters in every micro-batch's backward (DeepSpeed partitions gradients as they come)
    assert cost(dataclasses.replace(step, zero=2)) == pytest.approx(cost(step) * (m + 1) / 2)
    z1, z2 = Layout(1, 4, 8, 1, 1, False), Layout(1, 4, 8, 2, 1, False)
    assert mem(z1).buffers > mem(z2).buffers


def test_gradients_reduced_per_step_terms():
    """parallel.grad_reduction=per_step: the full gradients are held across the step (parameter dtype) and
    reduce-scattered once: ZeRO-2 2(D-1)/D instead of (m+1)(D-1)/D, ZeRO-3 (2m+1)(D-1)/D instead of 3m(D-1)/D.
    ZeRO-3 x PP gathering per step already reduces per step: the field changes nothing there."""
    cfg = load_model_config("13b")
    mem = lambda L: estimate_memory(cfg, L, 4096, 512, Hardware())  # noqa: E731
    cost = lambda L: estimate_step_time(cfg, L, 4096, 512, Hardware()).dp_comm  # noqa: E731
    for pp in (1, 4):
        P = max(stage_parameters(cfg, 1, pp))
        for zero in (2, 3):
            micro = Layout(1, pp, 8, zero, 1, False, "per_microbatch")
            step = dataclasses.replace(micro, grad_reduction="per_step")
            m = micro.micro_batches(512)
            assert mem(step).grads - mem(micro).grads == pytest.approx(2 * P, rel=1e-5)
            passes = {2: (2, m + 1), 3: (2 * m + 1, 3 * m)}[zero]
            assert cost(step) / cost(micro) == pytest.approx(passes[0] / passes[1])
    held = Layout(1, 4, 8, 3, 1, False, "per_step")
    assert held.reduces_per_step
    assert mem(dataclasses.replace(held, grad_reduction="per_step")).total == mem(held).total
    assert cost(dataclasses.replace(held, grad_reduction="per_step")) == cost(held)
    modes = {(L.pipeline_reshard, L.grad_reduction) for L in enumerate_layouts(cfg, 32, 512) if L.pp > 1 and L.zero == 3}
    assert modes == {("per_step", "per_microbatch"), ("per_microbatch", "per_microbatch"),
                     ("per_microbatch", "per_step")}, modes


def test_ranking_puts_fitting_layouts_first_and_bubble_counts():
    cfg = load_model_config("13b")
    cands = plan(cfg, 32, 512, 4096, Hardware(mem_gib=80))
    fitting = [c for c in cands if c.fits]
    assert fitting and all(c.fits for c in cands[: len(fitting)])
    assert [c.time.total for c in fitting] == sorted(c.time.total for c in fitting)
    piped = [c for c in fitting if c.layout.pp > 1]
    assert piped and all(c.time.bubble > 0 for c in piped)
    # 70b on 8 x 80 GiB cannot hold even its ZeRO-3-partitioned states
    assert not any(c.fits for c in plan(load_model_config("70b"), 8, 512, 4096, Hardware(mem_gib=80)))


def test_cli_prints_ranked_table_and_reason(capsys):
    assert main(["--model", "7b", "--gpus", "64", "--gpu-mem-gib", "80", "--global-batch", "1024",
                 "--seq-len", "4096", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "valid layouts" in out and "is first: predicted" in out and "fits" in out and "NO" in out
    assert main(["--model", "nope"]) == 2
