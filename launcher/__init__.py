"""megalm launcher: SLURM submission (sbatch/srun/`deepspeed --hostfile`), the restart supervisor,
preemption and requeue, run status and checkpoint upkeep.

Runs on login nodes: nothing here imports torch, directly or through `megalm`.
Entry point: `megalm-launch` (launcher.cli:main) or `python -m launcher`.
"""
