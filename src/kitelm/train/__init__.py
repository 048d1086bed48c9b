"""Training: the loop, optimizer groups and schedules, atomic checkpoints."""
