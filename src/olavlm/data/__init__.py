"""Datasets in LLaVA format: templates, whole-prompt tokenization, images, collation, samplers, checks.

Bad-input reasons (``REASONS``) and the ``BadSample`` exception live in :mod:`olavlm.data.errors`
and are re-exported here.
"""

from olavlm.data.errors import REASONS, BadSample

__all__ = ["REASONS", "BadSample"]
