"""The feature browser: HTML pages over the feature statistics (``cache_server.saes.features``)."""
