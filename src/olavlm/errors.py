"""User-facing error types.

A :class:`UserError` is a mistake in what the user asked for (a config field, a file, a folder):
the command line prints its message as one ``olavlm: error: ...`` line per problem and exits with
status 2, without a traceback. Anything else escaping a command is a bug in olavlm.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the field or file and says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message starts with the dotted name of the field."""


class CacheError(UserError, ValueError):
    """The target cache is missing, malformed, damaged, incomplete or built for something else."""


class StaleTarget(KeyError):
    """The cached entry was computed from other image bytes (sha1 differs): a cache miss, not a target."""
