"""Interoperability: released OLA-VLM checkpoints -> olavlm folders, olavlm -> transformers LLaVA.

* :mod:`olavlm.interop.reference`   ``olavlm convert reference SRC DST``
* :mod:`olavlm.interop.llava_export` ``olavlm export llava SRC DST [--push-to-hub REPO]``

Every problem with the user's input raises :class:`InteropError` (a :class:`~olavlm.errors.UserError`)
with a one-line message that names the key, field or file. See ``docs/interop.md``.
"""

from __future__ import annotations

from olavlm.errors import UserError


class InteropError(UserError):
    """A checkpoint or flag cannot be converted / exported; the message names the key, field or file."""
