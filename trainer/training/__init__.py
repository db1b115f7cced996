"""The training loop over a sweep of SAEs, its schedules, DDP and Ctrl-C handling."""
