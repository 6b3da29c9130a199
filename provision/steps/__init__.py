"""Step kinds: one module per kind, each exposing `KIND` (see `base.py`)."""
