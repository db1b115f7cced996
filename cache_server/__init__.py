"""The harvest service: runs a source model, stores reshaped activations in Zarr, serves them."""
