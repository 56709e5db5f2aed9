"""Offline evaluation (`megalm-eval`) and text generation (`megalm-generate`) from saved checkpoints of
any layout; see `evaluate`, `generate`, `windows` and `model_loading`."""
