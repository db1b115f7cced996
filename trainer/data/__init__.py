"""Getting activations in: the cache server client, the shuffled chunk stream into a device buffer,
and a cache server started from Python."""
