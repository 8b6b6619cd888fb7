"""The run directory: checkpoints, run log, lock, process setup and trackers."""
