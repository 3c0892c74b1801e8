"""User-facing error types.

A :class:`UserError` is a mistake in what the user asked for (a config field, a file, a folder):
the command line prints its message as one ``olavlm: error: ...`` line per problem and exits with
status 2, without a traceback. Anything else escaping a command is a bug in olavlm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A problem with the user's input; the message names the field or file and says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message starts with the dotted name of the field."""


class CacheError(UserError, ValueError):
    """The target cache is missing, malformed, damaged, incomplete or built for something else."""


class StaleTarget(KeyError):
    """The cached entry was computed from other image bytes (sha1 differs): a cache miss, not a target."""


def read_json_object(file: str | Path, error: type[Exception], prefix: str | None = None) -> dict[str, Any]:
    """``file`` parsed as a JSON object; anything else (unreadable, not JSON, not an object) raises
    ``error`` with one line that starts with ``prefix`` (default: the file's path)."""
    where = f"{file}" if prefix is None else prefix
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{where}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data
