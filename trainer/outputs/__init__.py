"""What a run leaves behind: metric sinks (JSONL, W&B), exported SAEs, plots."""
