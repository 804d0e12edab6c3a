"""The one error of loading a saved model, apart from the model's code: serving and the
registry catch it without importing torch, which a replica answering with seasonal naive (no
model promoted yet) then never loads."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A saved model that cannot be used (missing, corrupt, or from an incompatible version)."""
