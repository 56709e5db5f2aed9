"""megalm: 3D-parallel (TP x PP x DP/ZeRO) training of Llama-style decoders on DeepSpeed.

Packages: `config` (typed run configs), `data` (token shards -> samples -> batches), `parallel`
(process grid, tensor-parallel layers), `model` (the decoder), `training` (engine, loop, checkpoints),
`eval` and `export` (saved checkpoints -> loss, samples, Hugging Face, other layouts).
"""

__version__ = "0.1.0"
