"""Registered SAEs and what the server does with them: evaluation, feature statistics, custom text."""
