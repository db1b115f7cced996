"""The trainer side: talks to a cache server over HTTP only (never imports ``cache_server``)."""
