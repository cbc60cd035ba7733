"""The errors capscale reports as one line and exit code 2: something the user must
change in the config, the data or the model, found before heavy work starts."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible. The message names the field."""


class CheckpointError(ConfigError):
    """The checkpoint to resume from is damaged, incomplete or holds non-finite values.
    The message names the checkpoint and the file (or tensor)."""


class DataError(ValueError):
    """The task data does not fit the config. The message says what to change."""


class ModelError(ValueError):
    """A model could not be resolved or does not fit the task."""


INPUT_ERRORS = (ConfigError, CheckpointError, DataError, ModelError)


def describe(err: Exception) -> str:
    """``capscale: config error: ...`` (the one line printed for an input error)."""
    return f"capscale: {type(err).__name__.replace('Error', '').lower()} error: {err}"


def did_you_mean(key: object, known: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean <prefix><closest>?"`` for an unknown ``key``, or ``""``."""
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""
