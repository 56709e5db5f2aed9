"""`megalm-plan`: enumerate the valid (tp, pp, dp, ZeRO, micro batch, activation checkpointing) layouts of a
model on N GPUs, predict memory per GPU, flag what does not fit, and rank the rest by a simple
compute/communication model.

    layouts.py  what is valid (the same rules as config validation) and the Layout record
    memory.py   predicted bytes per GPU: parameters, gradients, optimizer state, activations, buffers
    cost.py     predicted step time: compute, pipeline bubble, TP / DP-ZeRO / PP communication
    cli.py      the command line and the README table (`--table`)
    measure.py  measured peak tensor memory of real training steps on CPU (validates memory.py)
"""
from .layouts import Layout, enumerate_layouts
from .memory import Hardware, MemoryEstimate, estimate_memory
from .cost import estimate_step_time

__all__ = ["Hardware", "Layout", "MemoryEstimate", "enumerate_layouts", "estimate_memory", "estimate_step_time"]
