"""megalm launcher: SLURM submission (sbatch/srun/`deepspeed --hostfile`), the restart supervisor,
preemption and requeue, run status and checkpoint upkeep.

Runs on login nodes: nothing here imports torch, directly or through `megalm` (of which only the
stdlib-only `megalm.rundir`, the run directory's names and rules, is imported).
Entry point: `megalm-launch` (launcher.cli:main) or `python -m launcher`.
"""
