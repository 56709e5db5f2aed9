"""Offline evaluation (`megalm-eval`) and text generation (`megalm-generate`) from saved checkpoints of
any layout; see `evaluate`, `generate`, `windows`, `model_loading`,
`shard_reader` (a step's tensors one at a time, no consolidation) and `stages` (evaluation at any (tp, pp, dp))."""
