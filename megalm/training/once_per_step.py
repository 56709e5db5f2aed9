"""Gradient reduction (and, for ZeRO-3 x PP, parameter gathering) once per optimizer step instead of
once per micro-batch: `parallel.grad_reduction` / `parallel.pipeline_reshard` = per_step. Used by the plain
engine's step at pp=1 (megalm.training.engine) and by the pipeline stage schedule (pipeline_schedule)."""
from __future__ import annotations


class OncePerStep:
    """One gradient reduce-scatter per optimizer step (`ParallelConfig.reduces_gradients_per_step`) and,
    with `hold_parameters` (ZeRO-3 x PP, `pipeline_reshard=per_step`), one all-gather per stage per step,
    as torchtitan's FSDP2 under PP (parameters unsharded across the micro-batches, gradients reduced at
    the last one).

    Parameters: ZeRO-3 releases (re-partitions) a parameter after a module's forward or backward once no
    module uses it, i.e. when its `ds_active_sub_modules` set is empty. A marker held in that set for
    the step keeps every parameter gathered from its first use to the last backward. Gradients: inside
    DeepSpeed's `engine.coalesce_grad_reduction()` each backward accumulates the full gradients on the
    parameters and leaving it reduce-scatters them once. Then the marker goes and
    `release_and_reset_all` re-partitions, before the update writes the new partitions; the update is
    `step()` at a boundary we set (inside the block DeepSpeed refuses `step()`, so the micro-steps are
    not counted one by one). Costs the full gradients (and, held, the stage's full parameters) in memory
    during the step."""

    _HELD = -1  # not a module id (DeepSpeed numbers modules from 0)

    def __init__(self, ds, hold_parameters: bool):
        self.ds, self.hold_parameters = ds, hold_parameters
        self._coalescing = None
        # DeepSpeed internals this relies on (deepspeed==0.19.8): refuse early, naming them, if they moved.
        needs = [(ds, "coalesce_grad_reduction")]
        if hold_parameters:
            needs.append((ds.optimizer, "_get_param_coordinator"))
        for owner, name in needs:
            if not callable(getattr(owner, name, None)):
                field = "pipeline_reshard" if hold_parameters else "grad_reduction"
                raise RuntimeError(f"parallel.{field}=per_step needs {type(owner).__name__}.{name} "
                                   f"(deepspeed==0.19.8); set parallel.{field}=per_microbatch or "
                                   "install that DeepSpeed version")

    def begin(self) -> None:
        if self.hold_parameters:
            for p in self.ds.module.parameters():
                p.ds_active_sub_modules.add(self._HELD)
        self._coalescing = self.ds.coalesce_grad_reduction()
        self._coalescing.__enter__()

    def end(self) -> None:
        """After the step's last backward: reduce the gradients, release the parameters."""
        self._coalescing.__exit__(None, None, None)
        self._coalescing = None
        if self.hold_parameters:
            for p in self.ds.module.parameters():
                p.ds_active_sub_modules.discard(self._HELD)
            self.ds.optimizer._get_param_coordinator().release_and_reset_all(self.ds.module)

    def update(self) -> None:
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        self.ds.set_gradient_accumulation_boundary(False)
