"""The GSA operator and its backends; gated linear attention (the GLA baseline's operator)."""

from .gla import gla
from .gsa import BACKENDS, available_backends, default_backend, gsa

__all__ = ["BACKENDS", "available_backends", "default_backend", "gla", "gsa"]
