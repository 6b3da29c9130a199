"""bootstrap: take a rented GPU box from nothing to a running, verified training job."""

__version__ = "0.1.0"
