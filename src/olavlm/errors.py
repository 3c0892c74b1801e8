"""Errors that mean "the user gave bad input", as opposed to a bug.

The command line reports a :class:`UserError` as one line (no traceback). Packages subclass it for
their own kinds of bad input; keep additions here small and additive.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad user input (file, flag, checkpoint content); the message is one line naming what is wrong."""
