"""Errors and warnings raised by recgen.

Each error also inherits the built-in exception it narrows, so callers that already catch
``ValueError`` or ``FileNotFoundError`` keep working (the pattern of ``peft.utils.error``).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DataWarning",
    "IndexMismatchError",
    "ModelOutputWarning",
    "RecgenError",
    "ServerError",
]


class RecgenError(Exception):
    """Base class of every error recgen raises on purpose."""


class DataError(RecgenError, ValueError):
    """Input data is malformed: the message names the file, line, field and value, and the fix."""


class ConfigError(RecgenError, ValueError):
    """A configuration value, file or override is invalid."""


class IndexMismatchError(RecgenError, ValueError):
    """A saved artifact (index, adapter) was built for another catalog, model or template."""


class ServerError(RecgenError, ConnectionError):
    """An inference server is down, unreachable, or refused the request."""


class DataWarning(UserWarning):
    """Input data was usable but something was dropped or repaired (counts are in the message)."""


class ModelOutputWarning(UserWarning):
    """Model output could not be parsed or grounded often enough to be worth a look."""
