"""Bad-input reasons and the exceptions that carry them.

Every problem a single record can have maps to exactly one canonical reason; the dataset either
skips the record (``data.on_bad_sample: skip``, counted per reason) or raises (``error``).
"""

from __future__ import annotations

from olavlm.errors import UserError

# Canonical bad-sample reasons, in the order reports list them.
REASONS = (
    "missing_image",         # the referenced image file does not exist
    "unreadable_image",      # the file exists but cannot be decoded (zero bytes, truncated, bomb, ...)
    "bad_image_size",        # aspect ratio / size after the geometry over data.max_image_aspect / max_geometry_pixels
    "bad_conversation",      # not a list, no turns, wrong role order, empty or non-string value
    "image_token_mismatch",  # number of <image> placeholders != number of images of the record
    "too_long",              # longer than max_length after image and task-token expansion
    "empty_target",          # no supervised token left (e.g. after truncation)
)


class BadSample(UserError):
    """One record cannot become a training sample; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, msg: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r} (known: {', '.join(REASONS)})")
        super().__init__(f"{reason}: {msg}")
        self.reason = reason
        self.msg = msg

    def __reduce__(self):  # picklable across dataloader worker processes
        return (BadSample, (self.reason, self.msg))


class NoValidRecord(UserError, RuntimeError):
    """``on_bad_sample: skip`` found no valid record at all to replace a bad one with."""
