"""Training: the one loop with its hooks, records and phases, the CAP step, the run's
state, checkpoints, teacher fine-tuning and evaluation."""
