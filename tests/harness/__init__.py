"""Reusable test harness: multi-rank gloo pools, free ports and subprocess runs that fail with stacks."""
from .distributed import RankPool, RankPoolError, free_port
from .processes import run_command, signal_tree

__all__ = ["RankPool", "RankPoolError", "free_port", "run_command", "signal_tree"]
