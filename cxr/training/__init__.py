"""The training loop's parts: setup, resume and the memory probe."""
