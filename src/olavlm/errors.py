"""The base class of mistakes in what a user gave olavlm: a config field, a file, data, a cache.

The ``olavlm`` command prints any :class:`UserError` as one line (``olavlm: error: ...``) and exits
2; ``--debug`` or ``OLAVLM_DEBUG=1`` shows the traceback instead. Subclass it for every error a user
can fix by changing their input, and make the message name the field or the file.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names the field or file (one line, no traceback)."""
