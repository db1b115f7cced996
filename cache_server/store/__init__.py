"""The dataset store: Zarr groups on disk or in a bucket, their manifests and chunk reads."""
