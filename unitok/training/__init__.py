"""The training engine: run folders, checkpoints, the machine, the objective, the trainers."""
