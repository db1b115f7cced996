"""Harvests: the loop that runs the model into chunks, the job queue over it, and its Ray executor."""
