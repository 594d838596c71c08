"""User-facing errors.

A :class:`NpasError` is a mistake in what the user gave us (a file, a flag, a plan
field). The CLI prints its message as one line and exits with code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class NpasError(Exception):
    """A user error: one clear line that names the file, layer or field at fault."""

    exit_code = 2


class ModelError(NpasError):
    """The ONNX model cannot be loaded or imported (bad file, unsupported op, bad shape)."""


class TargetError(NpasError):
    """The requested target is unknown or malformed."""


class PlanError(NpasError):
    """A pruning plan is malformed or does not fit the model; names the layer and field."""
