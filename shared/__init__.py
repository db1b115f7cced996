"""What the cache server and the trainer both import: API schemas, reshape functions, chunk codec, ids."""
