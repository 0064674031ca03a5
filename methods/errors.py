"""Errors raised by the method library.

Every error names the offending field (or layer), the value, and the fix, and is raised before any
compute is spent.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class QFTError(Exception):
    """Base class of all qftbench errors."""


class ConfigError(QFTError, ValueError):
    """A bad method name, hyperparameter or value."""


class ShapeError(QFTError, ValueError):
    """A layer whose shape is incompatible with the method's pooling, repeat or quantization blocks."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f' Did you mean "{close[0]}"?' if close else ""
