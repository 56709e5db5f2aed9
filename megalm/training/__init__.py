"""Engine construction, the training loop, schedules, metrics and checkpoints (`python -m megalm.train`)."""
