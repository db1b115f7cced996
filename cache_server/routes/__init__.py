"""HTTP routes: thin functions over the service layer in ``cache_server``."""
