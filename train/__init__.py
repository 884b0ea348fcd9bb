"""Training: run.py (the entry users call), the loop, checkpoints, DDP via torchrun."""
