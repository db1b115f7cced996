"""Judging an SAE: held-out reconstruction and sparsity metrics, and downstream loss with it spliced in."""
