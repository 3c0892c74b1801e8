"""Error types shared across olavlm.

``UserError`` marks a problem the user can fix (a bad file, a damaged checkpoint, a busy run
directory): its message is one line naming the field or file, and the command line reports it as
such instead of a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or files; ``str(error)`` is one line naming the field or file."""
