"""Exceptions for failures a user can cause (bad flags, missing or mismatched files).

Tools print these as one line naming the flag or file (``fairseq-eval-lm``,
``knnlm-build-index``, ...); anything else is our own bug and keeps its traceback.
Plain Python, imported by every other module: it imports nothing from the package.
"""

from __future__ import annotations


class KNNLMError(RuntimeError):
    """A failure the user can cause and fix: reported as one line, no traceback."""


class FlagError(KNNLMError, ValueError):
    """A command-line value that is out of range or inconsistent with another flag."""
