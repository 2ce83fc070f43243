"""Training: towers and objectives, losses, the AlignmentModule, GradCache and callbacks."""
