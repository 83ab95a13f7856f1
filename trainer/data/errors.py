"""Errors and warnings of the data layer.

``DataError`` is a ``ValueError`` so callers that treat every bad input alike can catch
``ValueError``; its message always names the folder or file and says what to do.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data folder, image or caption that training cannot use."""


class ImageLoadError(DataError):
    """One image file could not be opened or decoded (corrupt, truncated, not an image)."""


class DataWarning(UserWarning):
    """A file was skipped; training goes on with the others."""
