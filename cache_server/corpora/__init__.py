"""Corpora: uploaded text and JSONL, Hugging Face datasets, and their on-disk token streams."""
