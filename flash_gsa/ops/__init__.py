"""The GSA operator and its backends."""

from .gsa import BACKENDS, available_backends, default_backend, gsa

__all__ = ["BACKENDS", "available_backends", "default_backend", "gsa"]
