"""Offline evaluation (`megalm-eval`) and text generation (`megalm-generate`) from saved checkpoints of
any layout; see `evaluate`, `generate`, `windows`, `model_loading`,
`stages` (evaluation at any (tp, pp, dp))."""
